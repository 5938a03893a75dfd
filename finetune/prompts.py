"""A job's prompts with their metadata: the prompts file (`prompts_file`) and the table that hands each
sampled prompt's metadata to the reward.

Some rewards need more than the prompt: GenEval's record of the objects, counts, colours and positions it
asks for, or an OCR target (`t2i_reward.rewarders.metadata`). A job gives one JSON object per training prompt
inline (`prompt_metadata`, and `eval_prompt_metadata` for its evaluation prompts) or reads prompts from a
file under the data directory:
- `.jsonl`: one JSON object a line with a string `prompt`; the whole object is that prompt's metadata, as
  Flow-GRPO's and GenEval's metadata files are written (`{"tag": ..., "include": [...], "prompt": ...}`);
- `.txt`: one prompt a line, no metadata (Flow-GRPO's OCR prompt lists: the target is in the prompt's quotes).
Blank lines are skipped. The file is read once, when the job is prepared (like topics drawn as prompts), so
the stored spec holds the prompts and their metadata and the job is reproducible whatever becomes of the file.

Every sample of a prompt (a GRPO group) carries that prompt's metadata: the table is keyed by the prompt's
text, so a prompt given twice must carry the same metadata both times (`check_prompt_metadata`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional, Sequence

from t2i_reward.rewarders.errors import InvalidRequestError
from t2i_reward.rewarders.metadata import check_metadata

from .spec import METADATA_LIMITS, MAX_PROMPTS, MAX_TEXT_CHARS, JobSpec, check_prompt_metadata, confined

SUFFIXES = (".jsonl", ".txt")
# MAX_PROMPTS lines of a long prompt with a GenEval-sized record fit with room to spare; a larger file is
# refused before it is read (the stored spec is smaller still: the service's max_spec_bytes)
MAX_FILE_BYTES = 32 << 20


class PromptMetadata:
    """Each prompt's metadata object, by the prompt's text; `{}` for a prompt that has none."""

    def __init__(self, table: Mapping[str, dict]):
        self.table = dict(table)

    @classmethod
    def of_spec(cls, spec: JobSpec) -> Optional["PromptMetadata"]:
        """The table of a spec's training and evaluation prompts, or None when it gives no metadata."""
        pairs = list(zip(spec.prompts or [], spec.prompt_metadata or []))
        pairs += list(zip(spec.eval_prompts or [], spec.eval_prompt_metadata or []))
        return cls(dict(pairs)) if pairs else None

    def __call__(self, prompts: Sequence[str]) -> list[dict]:
        return [self.table.get(p, {}) for p in prompts]


def metadata_for(table: Optional[PromptMetadata], prompts: Sequence[str]) -> Optional[list[dict]]:
    """One metadata object per prompt for a reward call, or None for a job without metadata (the reward then
    sees none, as before metadata existed)."""
    return table(prompts) if table is not None else None


def prompts_file_path(name: str, data_dir: Path) -> Path:
    """The prompts file under `data_dir`. One message whether it is missing or outside (as `pretrain_data`)."""
    try:
        path = confined(name, data_dir, "prompts_file")
    except (ValueError, OSError):
        path = None
    if path is None or not path.is_file():
        raise ValueError(f"prompts_file {name!r}: no such file in the data directory (paths outside it are refused)")
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"prompts_file {name!r}: must be .jsonl (one JSON object a line, with 'prompt') or .txt (one prompt a line)")
    return path


def load_prompts_file(name: str, data_dir: Path) -> tuple[list[str], Optional[list[dict]]]:
    """(prompts, their metadata or None for a .txt file) of `prompts_file` `name`; ValueError naming the line."""
    path = prompts_file_path(name, data_dir)
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ValueError(f"prompts_file {name!r} is {size} bytes; the limit is {MAX_FILE_BYTES}")
    try:
        text = path.read_bytes()[:MAX_FILE_BYTES + 1].decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompts_file {name!r} is not UTF-8 text (byte {e.start})") from None
    jsonl = path.suffix.lower() == ".jsonl"
    prompts, metadata = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"prompts_file {name!r} line {number}"
        if len(prompts) == MAX_PROMPTS:
            raise ValueError(f"prompts_file {name!r} holds more than {MAX_PROMPTS} prompts")
        if jsonl:
            record = _record(line, where)
            prompt = record["prompt"]
            try:
                metadata.append(check_metadata([record], 1, METADATA_LIMITS)[0])
            except InvalidRequestError as e:
                raise ValueError(f"{where}: {str(e).replace('metadata[0]', 'the record', 1)}") from None
        else:
            prompt = line.strip()
        _check_prompt(prompt, where)
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"prompts_file {name!r} holds no prompts")
    if jsonl:
        check_prompt_metadata(list(zip(prompts, metadata)))
    return prompts, (metadata if jsonl else None)


def _record(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{where} is not JSON: {str(e)[:120]}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where} must be a JSON object with a 'prompt', got {type(record).__name__}")
    if not isinstance(record.get("prompt"), str):
        raise ValueError(f"{where} has no 'prompt' string")
    return record


def _check_prompt(prompt: str, where: str) -> None:
    """What the spec's prompts must be, said with the line (the spec's own check would name a list index)."""
    if not prompt.strip():
        raise ValueError(f"{where}: the prompt is empty")
    if len(prompt) > MAX_TEXT_CHARS:
        raise ValueError(f"{where}: the prompt has {len(prompt)} characters; the limit is {MAX_TEXT_CHARS}")
    if "\x00" in prompt:
        raise ValueError(f"{where}: the prompt contains a NUL character")
