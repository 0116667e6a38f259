"""Pinned numbers for the tiny job (as torchtune pins its recipes' losses): a change that alters
the training math (data order, model build, levers, loss normalisation, optimizer) fails here."""

import pytest
import torch

# The first 10 optimizer steps of jobs/tiny-cpu.yaml (seed 0, one worker, one CPU thread), recorded
# from the code before the structure change and unchanged since.
EXPECTED_LOSS = [6.9884843826293945, 6.998772621154785, 6.989872455596924, 6.929351329803467, 6.834429740905762,
                 6.760223865509033, 6.717260360717773, 6.671441078186035, 6.624606132507324, 6.641969680786133]
EXPECTED_GRAD_NORM = [1.2171540260314941, 1.2043849229812622, 1.1767315864562988, 1.2342332601547241,
                      1.254033088684082, 1.0170432329177856, 0.8190815448760986, 0.7125677466392517,
                      0.6201761960983276, 0.48222774267196655]


@pytest.fixture()
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_tiny_job_losses_are_pinned(root, monkeypatch, one_thread):
    from transformers import get_scheduler

    from runner.data import MicroBatches, collate, tokenize
    from runner.loading import load_job
    from runner.model import build_tokenizer, build_trainable
    from runner.train.worker import train_step

    monkeypatch.chdir(root)
    spec = load_job("jobs/tiny-cpu.yaml")
    t = spec.training
    tok = build_tokenizer(spec.tokenizer, spec.model)
    data = tokenize(spec.data, tok, seed=t.seed)
    assert (len(data.train), len(data.eval), data.num_train_tokens) == (304, 16, 13463)
    batches = MicroBatches(data.train, t.micro_batch_size, tok.pad_token_id, t.seed)
    built = build_trainable(spec, torch.device("cpu"), len(tok), check_batch=collate([batches.rows[0]], tok.pad_token_id))
    assert built.layers == [0, 2]
    params = [p for p in built.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    sched = get_scheduler(t.lr_scheduler, opt, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps)
    losses, norms = [], []
    for _ in range(10):
        m = train_step(built.net, built.model, batches, opt, sched, t, torch.device("cpu"), 1)
        losses.append(m["loss"])
        norms.append(m["grad_norm"])
        # Trainable tokens (labels that carry a loss) are fewer than the positions processed.
        assert 0 < m["_trainable_tokens"] < m["_tokens"]
        assert m["trainable_tokens_per_s"] / m["tokens_per_s"] == pytest.approx(m["_trainable_tokens"] / m["_tokens"])
    assert losses == pytest.approx(EXPECTED_LOSS, rel=1e-5)
    assert norms == pytest.approx(EXPECTED_GRAD_NORM, rel=1e-4)
