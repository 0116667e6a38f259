"""From what a user writes to the typed spec: YAML files, `--set` overrides, paths relative to the
job file, and the one error message.

Everything goes through `load_job` / `load_search_space` (or `job_from_dict` for a spec crossing Ray),
which report *every* problem at once (dotted path + what to do) as one `SpecError`, before Ray or a
GPU is touched.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from runner.spec import CREDENTIAL_OPTIONS, JobSpec, SearchSpaceSpec, SpecError


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """`a.b=c` strings into a nested dict; values parsed as YAML (`3`, `true`, `[1,2]`)."""
    out: dict[str, Any] = {}
    problems = []
    for item in overrides or []:
        if "=" not in item:
            problems.append(f"{item!r}: expected dotted.key=value")
            continue
        key, raw = item.split("=", 1)
        try:
            value = yaml.load(raw, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as e:
            problems.append(f"{key}: the value {raw!r} is not valid YAML ({str(e).splitlines()[0]})")
            continue
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    if problems:
        raise SpecError("--set", problems)
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last silently:
    a second `training:` block would drop the first's settings)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} appears twice, on lines {seen[key]} and {line}: the second would "
                    "silently replace the first; merge them", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def deep_merge(base: dict, update: dict) -> dict:
    merged = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def redact(text: str) -> str:
    """Any `scheme://user:secret@host`, and pyarrow's `?access_key=...&secret_key=...` URI options,
    inside `text` with the credentials masked."""
    text = re.sub(r"(\w+://)[^/@\s:]+(:[^/@\s]*)?@", r"\1***@", text)
    return re.sub(rf"([?&](?:{CREDENTIAL_OPTIONS})=)[^&\s'\"]*", r"\1***", text)


def _format_errors(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        # Drop pydantic's union/literal branch tags so the path reads as the user's YAML keys.
        loc = [str(p) for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))]
        path = ".".join(loc) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check spelling; see the spec reference in README)"
        elif "input" in e and e["type"] not in ("missing",) and not isinstance(e["input"], dict):
            msg = f"{msg}, got {redact(repr(e['input']))}"
        problems.append(f"{path}: {msg}")
    # A union (e.g. layers: 'none'|'all'|list) reports one error per branch; keep each path once.
    seen, unique = set(), []
    for p in problems:
        key = p.split(":", 1)[0]
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def _read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SpecError(str(path), ["file not found"])
    try:
        raw = yaml.load(p.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise SpecError(str(path), [f"not valid YAML: {e}"]) from e
    if not isinstance(raw, dict):
        raise SpecError(str(path), ["top level must be a mapping of keys"])
    return raw


def job_from_dict(raw: dict, source: str = "job") -> JobSpec:
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(source, _format_errors(e)) from None


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """A job file, with `--set` overrides. Relative local paths written in the file are relative to
    the file's folder; paths given with `--set` are relative to the current directory."""
    written = _read_yaml(path)
    hints = resolve_paths(written, Path(path).parent)
    raw = deep_merge(written, parse_overrides(overrides))
    spec = job_from_dict(raw, str(path))
    _check_paths(spec, str(path), hints)
    return spec


# Fields that hold a local path or a hub id.
PATH_FIELDS = (("data", "path"), ("model", "name_or_path"), ("tokenizer", "name_or_path"))


def map_local_paths(raw: dict, fn) -> dict:
    """`fn(path)` for each path field of a job dict that names an existing local file or folder
    (hub ids and missing paths are left as they are); in place, returned for chaining."""
    for section, field in PATH_FIELDS:
        value = (raw.get(section) or {}).get(field)
        if isinstance(value, str) and value and looks_local(value) and Path(value).exists():
            raw[section][field] = fn(value)
    return raw


def resolve_paths(raw: dict, folder: Path) -> dict[str, str]:
    """Rewrite the relative local paths of a job dict (in place) to where they are from the current
    directory, reading them as relative to `folder` (relative when inside the current directory,
    else absolute). Returns, for a path that does not exist there, a hint for its error message."""
    hints = {}
    cwd = Path.cwd().resolve()
    for section, field in PATH_FIELDS:
        value = (raw.get(section) or {}).get(field)
        if not isinstance(value, str) or Path(value).expanduser().is_absolute() or value.startswith("~"):
            continue
        target = (folder / value).resolve()
        if not (looks_local(value) or target.exists()):
            continue  # a hub id
        resolved = target.relative_to(cwd) if target.is_relative_to(cwd) else target
        raw[section][field] = str(resolved)
        if not target.exists():
            hint = f"a path in a job file is relative to the file's folder ({folder}/)"
            if Path(value).exists():
                hint += f": write {os.path.relpath(Path(value).resolve(), folder.resolve())!r} for the {value!r} " \
                        "of the current directory"
            hints[f"{section}.{field}"] = hint
    return hints


def _check_paths(spec: JobSpec, source: str, hints: dict[str, str] | None = None) -> None:
    """Local paths that look local must exist (hub ids have no leading ./ or /, and no file suffix)."""
    problems = []
    for section, field in PATH_FIELDS:
        value = getattr(getattr(spec, section), field)
        if value and looks_local(value) and not Path(value).exists():
            hint = (hints or {}).get(f"{section}.{field}")
            problems.append(f"{section}.{field}: local path {value!r} does not exist" + (f" ({hint})" if hint else ""))
    if problems:
        raise SpecError(source, problems)


def looks_local(value: str) -> bool:
    """A local path rather than a hub id (`org/name`: one slash, no leading ./ or /, no data-file suffix;
    dots are fine, as in meta-llama/Llama-3.1-8B)."""
    return value.startswith((".", "/", "~")) or Path(value).suffix in (".json", ".jsonl", ".parquet") \
        or Path(value).exists() or value.count("/") != 1


def load_search_space(path: str | Path, overrides: list[str] | None = None) -> SearchSpaceSpec:
    raw = deep_merge(_read_yaml(path), parse_overrides(overrides))
    try:
        return SearchSpaceSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(str(path), _format_errors(e)) from None


def dump_yaml(spec: BaseModel) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict to {'a.b': v} (MLflow params)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
