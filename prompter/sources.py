"""Reading prompt corpora: local JSON / JSONL / CSV / Parquet / plain text, or a hub dataset.

The text field is found automatically (`prompt`, then `text`) unless given. Prompts are stripped,
empty ones dropped, and duplicates removed keeping the first occurrence, so a corpus is a list of
distinct strings in source order.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterable

from t2i_reward.rewarders.errors import RewardError

TEXT_FIELDS = ("prompt", "text")
DEFAULT_SOURCE = "THUDM/ImageRewardDB"


class PromptSourceError(RewardError):
    """The prompt source cannot be read, or holds no usable text field."""


def read_prompts(source: str, text_field: str | None = None) -> list[str]:
    """All distinct prompts of `source`: a local file, or a hub dataset id such as THUDM/ImageRewardDB."""
    path = Path(source).expanduser()
    if path.is_file():
        return dedupe(_read_file(path, text_field))
    if path.exists() or source.startswith(("/", ".", "~")) or source.count("/") != 1:
        raise PromptSourceError(f"prompt source {source!r}: not a file, and not a hub dataset id (org/name)")
    return dedupe(_read_hub(source, text_field))


def dedupe(prompts: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for p in prompts:
        p = " ".join(p.split())  # collapse whitespace so near-identical copies count as one
        if p:
            seen.setdefault(p, None)
    return list(seen)


def _pick_field(columns: Iterable[str], text_field: str | None, where: str) -> str:
    columns = list(columns)
    if text_field is not None:
        if text_field not in columns:
            raise PromptSourceError(f"{where}: no field {text_field!r} (fields: {', '.join(map(str, columns))})")
        return text_field
    for name in TEXT_FIELDS:
        if name in columns:
            return name
    raise PromptSourceError(f"{where}: no 'prompt' or 'text' field (fields: {', '.join(map(str, columns))}); pass --text-field")


def _from_records(records: list, text_field: str | None, where: str) -> list[str]:
    if all(isinstance(r, str) for r in records):
        return records
    if not records or not all(isinstance(r, dict) for r in records):
        raise PromptSourceError(f"{where}: expected a list of strings or of objects")
    field = _pick_field(records[0].keys(), text_field, where)
    return [r[field] for r in records if isinstance(r.get(field), str)]


def _read_file(path: Path, text_field: str | None) -> list[str]:
    suffix = path.suffix.lower()
    where = str(path)
    try:
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):  # {"prompts": [...]} or similar: the one list inside
                lists = [v for v in data.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise PromptSourceError(f"{where}: expected a JSON list (or an object holding one list)")
                data = lists[0]
            if not isinstance(data, list):
                raise PromptSourceError(f"{where}: expected a JSON list")
            return _from_records(data, text_field, where)
        if suffix in (".jsonl", ".ndjson"):
            lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            return _from_records(lines, text_field, where)
        if suffix in (".csv", ".tsv"):
            with path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                field = _pick_field(reader.fieldnames or [], text_field, where)
                return [row[field] for row in reader if row.get(field)]
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            schema = pq.read_schema(path)
            field = _pick_field(schema.names, text_field, where)
            return [p for p in pq.read_table(path, columns=[field]).column(field).to_pylist() if isinstance(p, str)]
        if suffix in (".txt", ".text", ""):
            return path.read_text(encoding="utf-8").splitlines()
    except PromptSourceError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise PromptSourceError(f"{where}: cannot read ({e})") from None
    except Exception as e:  # pyarrow raises its own types for broken files
        raise PromptSourceError(f"{where}: cannot read ({type(e).__name__}: {e})") from None
    raise PromptSourceError(f"{where}: unknown format {suffix!r}; use .json, .jsonl, .csv, .tsv, .parquet or .txt")


def _read_hub(repo_id: str, text_field: str | None) -> list[str]:
    """A hub dataset's prompt table. ImageRewardDB keeps its prompts in `metadata-*.parquet` beside the
    image shards; those are read alone, so no image is downloaded. Other datasets: every data file."""
    try:
        from huggingface_hub import HfApi, hf_hub_download

        files = HfApi().list_repo_files(repo_id, repo_type="dataset")
        data = [f for f in files if f.rsplit("/", 1)[-1].startswith("metadata") and f.endswith(".parquet")]
        if not data:
            data = [f for f in files if f.endswith((".parquet", ".jsonl", ".json", ".csv"))]
        if not data:
            raise PromptSourceError(f"hub dataset {repo_id}: no parquet/jsonl/json/csv file to read prompts from")
        local = [Path(hf_hub_download(repo_id, f, repo_type="dataset")) for f in data]
    except PromptSourceError:
        raise
    except Exception as e:
        raise PromptSourceError(
            f"hub dataset {repo_id}: cannot download ({type(e).__name__}: {e}). Pass a local file with --source instead."
        ) from None
    prompts: list[str] = []
    for f in local:
        prompts += _read_file(f, text_field)
    return prompts
