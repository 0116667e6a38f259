"""Issue 4 benchmark: predicted (fitrun estimate, CPU fake-tensor trace) vs measured peak reserved
memory for configurations of the Llama-3-8B architecture, in one process on one GPU.

    PYTHONPATH=. python bench/estimate_accuracy.py --out bench/results/estimate-accuracy.md

Each configuration: LoRA wrapped on one shared random-init base, three optimizer steps (the
second and third carry AdamW state) through the worker's own `train_step`, peaks reset per step,
`torch.cuda.empty_cache()` between configurations. Predictions run in parallel CPU processes.
"""

import argparse
import datetime
import os
from concurrent.futures import ProcessPoolExecutor

CONFIGS = [  # (seq, micro, r, k, placement, extra overrides)
    (2048, 1, 16, 0, "first", []),
    (2048, 1, 16, 32, "first", []),
    (2048, 1, 16, 16, "first", []),
    (2048, 1, 16, 16, "every_n", []),
    (2048, 1, 16, 16, "last", []),
    (2048, 1, 8, 24, "first", []),
    (2048, 1, 64, 8, "first", []),
    (2048, 2, 16, 32, "first", []),
    (2048, 2, 16, 24, "every_n", []),
    (1024, 2, 32, 0, "first", []),
    (1024, 1, 64, 4, "last", []),
    (4096, 1, 16, 32, "first", []),
    (4096, 1, 16, 28, "first", []),
    (4096, 2, 8, 32, "first", []),
    (2048, 1, 16, 0, "first", ["training.loss=hf"]),
    (2048, 1, 16, 32, "first", ["lora.adapter_dtype=model"]),
]


def overrides(seq, mb, r, k, placement, extra):
    return ["model.init=random", f"data.sequence_len={seq}", f"training.micro_batch_size={mb}", f"lora.r={r}",
            f"lora.lora_alpha={2 * r}", "activation_checkpointing.layers=none", f"activation_checkpointing.count={k}",
            f"activation_checkpointing.placement={placement}", "training.gradient_accumulation_steps=1", *extra]


def predict(cfg):
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    torch.set_num_threads(1)
    from runner.estimate.trace import estimate
    from runner.loading import load_job

    return estimate(load_job("jobs/llama3-8b-lora.yaml", overrides(*cfg)), "cuda").peak_reserved_gib


def measure(cfg):
    import torch

    from runner.loading import load_job
    from runner.memory import PeakMemory
    from runner.model import build_trainable
    from runner.train.worker import train_step

    spec = load_job("jobs/llama3-8b-lora.yaml", overrides(*cfg))
    device = torch.device("cuda")
    built = build_trainable(spec, device)
    model, net = built.model, built.net
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in
            torch.randint(6, 128000, (4, spec.data.sequence_len), generator=g).tolist()]

    class Batches:  # full-length random-token micro-batches (memory does not depend on the values)
        position = 0

        def next(self):
            self.position += 1
            ids = torch.tensor([rows[(self.position + i) % 4]["input_ids"] for i in range(spec.training.micro_batch_size)])
            return {"input_ids": ids, "labels": ids.clone()}

    memory = PeakMemory(device)
    peak = 0.0
    for _ in range(3):
        memory.reset()
        train_step(net, model, Batches(), opt, sched, spec.training, device, 1)
        peak = max(peak, memory.peaks_gib()["peak_reserved_gib"])
    del opt, sched, net, trainable, built, model
    torch.cuda.empty_cache()
    return peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args()
    import multiprocessing as mp

    pool = ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn"))
    predictions = [pool.submit(predict, cfg) for cfg in CONFIGS]

    import torch
    from gpu import hardware

    rows = []
    for cfg in CONFIGS:
        try:
            measured = measure(cfg)
        except torch.OutOfMemoryError:
            measured = float("nan")
        predicted = predictions[CONFIGS.index(cfg)].result()
        err = (predicted - measured) / measured * 100
        rows.append((cfg, predicted, measured, err))
        print(f"{cfg} predicted {predicted:.2f} measured {measured:.2f} error {err:+.1f}%", flush=True)
    max_err = max(abs(r[3]) for r in rows)
    lines = [f"# fitrun estimate: predicted vs measured peak reserved memory ({datetime.date.today()})", "",
             f"- hardware: {hardware()}",
             "- model: Llama-3-8B architecture (random init), bf16, SDPA, LoRA on all linear layers (peft defaults: "
             "fp32 adapters unless noted), fused AdamW, chunked loss unless noted; full-length sequences",
             "- measured: max of `torch.cuda.max_memory_reserved` over 3 optimizer steps (accumulation 1), one process, "
             "`empty_cache()` between configurations; predicted: `runner.estimate.trace.estimate(spec, 'cuda')` on CPU",
             "- the CUDA constants in runner/estimate/trace.py were fitted on the five runs of "
             "train-placements-2026-11-29.md (separate processes through Ray Train), not on these",
             "- command: `PYTHONPATH=. python bench/estimate_accuracy.py --out <file>`", "",
             "| seq | micro-batch | r | k | placement | other | predicted GiB | measured GiB | error % |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (seq, mb, r, k, pl, extra), pred, meas, err in rows:
        lines.append(f"| {seq} | {mb} | {r} | {k} | {pl} | {' '.join(extra) or '-'} | {pred:.2f} | {meas:.2f} | {err:+.1f} |")
    lines += ["", f"max_abs_error_pct: {max_err:.1f}"]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
