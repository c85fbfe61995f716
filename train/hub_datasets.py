"""A Hugging Face Hub dataset repo id as --data (owner/name, or owner/name/config): the train split's .parquet
files of the config, fetched once into a folder of their own, which --data then names (the trainers read a
folder of .parquet shards as one split: sft.read_json_records, data.iter_documents). In a repo of one config
the third part may name a split instead (HuggingFaceH4/ultrafeedback_binarized/train_prefs). Offline, a repo
fetched before is read from the local Hub cache.

The Hub's dataset layouts (its parquet files, as `datasets` writes them and the Hub's converter does):
    data/train-00000-of-00002.parquet       one config ("default"), split in the file name
    main/train-00000-of-00001.parquet       a config a folder (openai/gsm8k's main/ and socratic/)
    main/train/0000.parquet                 a config a folder, the split a folder in it
"""
import os
import re
import shutil
from pathlib import Path

from tritongpt.errors import UserError, first_line, note
from tritongpt.train.gpt2_weights import hub_error

SPLIT = "train"
DEFAULT_CONFIG = "default"  # the Hub's name for a repo's one config when it has no folder of its own
_DATASET_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.-]+)?")
# a --data that ends like this is a file meant here, mistyped or missing, not a repo to ask the Hub for
_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".txt", ".bin", ".npy", ".csv")
_PASS_FILES = "download its .parquet files elsewhere and pass them (a file, or a folder of one split's)"


def is_hub_dataset(spec) -> bool:
    """owner/name or owner/name/config given as --data that is no path here: a Hub dataset id. Not when `owner` is
    a folder here (data/train.jsonl mistyped is a path), nor when it ends in a data file's suffix."""
    if not isinstance(spec, str) or _DATASET_ID.fullmatch(spec) is None or spec.lower().endswith(_FILE_SUFFIXES):
        return False
    return not Path(spec).expanduser().exists() and not Path(spec.split("/")[0]).expanduser().exists()


def _split_and_config(path: str):
    """(config, split) of a repo's .parquet file by the layouts above; the split is the file name's first word
    (train-00000-of-00002, train_prefs-...), or its folder's name when the name is a number alone (0000)."""
    parts = path.split("/")
    stem = parts[-1][:-len(".parquet")]
    head = stem.split("-")[0]
    if re.fullmatch(r"[\d_]+", head) and len(parts) > 1:  # main/train/0000.parquet
        split, config = parts[-2], parts[:-2]
    else:
        split, config = head, parts[:-1]
    config = "/".join(config)
    return (DEFAULT_CONFIG if config in ("", "data") else config), split


def _listed(names, n: int = 8) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def train_files(repo: str, files, part=None, split: str = SPLIT):
    """(config, split, the repo paths of its .parquet files in name order): the train split (or `split`: LAMBADA's
    test split) of config `part` (None: the repo's one config), or, in a repo of one config, the split `part` names
    (HuggingFaceH4's train_prefs); refused, naming what the repo has, when it has no .parquet, several configs and
    none named, no such config, or no such split."""
    parquet = [f for f in files if f.endswith(".parquet")]
    if not parquet:
        raise UserError(f"the Hub dataset {repo} has no .parquet files (it has {_listed(files) or 'no files'}); "
                        f"{_PASS_FILES}")
    by_config = {}
    for f in parquet:
        c, in_split = _split_and_config(f)
        by_config.setdefault(c, {}).setdefault(in_split, []).append(f)
    config, wanted = part, split
    if len(by_config) == 1 and part is not None and part not in by_config and part in next(iter(by_config.values())):
        config, wanted = next(iter(by_config)), part  # a split named where a config would be: the only config's
    if config is None:
        if len(by_config) > 1:
            raise UserError(f"the Hub dataset {repo} has several configs ({_listed(by_config)}): name one, as "
                            f"{repo}/{sorted(by_config)[0]}")
        config = next(iter(by_config))
    if config not in by_config:
        raise UserError(f"the Hub dataset {repo} has no config {config!r} (its configs: {_listed(by_config)})")
    splits = by_config[config]
    if wanted not in splits:
        like = sorted(splits, key=lambda name: (not name.startswith(split), name))[0]  # train_prefs before test_*
        other = f"; name one as {repo}/{like}" if len(by_config) == 1 else ""
        raise UserError(f"the Hub dataset {repo} (config {config}) has no {wanted} split of .parquet files (its "
                        f"splits: {_listed(splits)}{other}; its files: {_listed(sum(splits.values(), []))}); "
                        f"{_PASS_FILES}")
    return config, wanted, sorted(splits[wanted])


def _link(target: Path, link: Path):
    """link -> target, replacing what was there in one step (ranks of one run may fetch at once); a copy where
    the system makes no links (Windows without the privilege)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    try:
        os.symlink(Path(target).absolute(), tmp)
    except OSError:
        shutil.copyfile(target, tmp)
    os.replace(tmp, link)


def _repo_files(repo: str, cache_dir=None) -> tuple:
    """(the dataset repo's files, None), as the Hub lists them; where the Hub cannot be asked (HF_HUB_OFFLINE, no
    network), (those of the repo's snapshot in the local Hub cache, that snapshot), noted, so that data fetched
    before reads again offline (hf_hub_download then answers from the cache too, as for a model's files)."""
    from huggingface_hub import list_repo_files, snapshot_download

    try:
        return list_repo_files(repo, repo_type="dataset"), None
    except Exception as e:
        if {"GatedRepoError", "RepositoryNotFoundError"} & {c.__name__ for c in type(e).__mro__}:
            raise  # the Hub answered: no cache stands in for that
        why = type(e).__name__
        try:
            snapshot = Path(snapshot_download(repo, repo_type="dataset", cache_dir=cache_dir, local_files_only=True))
        except Exception:
            raise e from None  # nothing cached either: the Hub's error is the one to name
    note(f"{repo}: the Hugging Face Hub could not list its files ({why}); reading those of its snapshot in the "
         f"local Hub cache, {snapshot}")
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()), snapshot


_SHARD = re.compile(r"(.*)-(\d+)-of-(\d+)\.parquet")  # train-00000-of-00003.parquet: the first of 3


def _missing_shards(names) -> list:
    """The shards a split's -N-of-T names say it has that are not among them (a cached snapshot whose download was
    cut short holds the first few): their names. The numbers are compared as numbers, not as text: writers pad
    them (train-00003-of-00012) or not (train-3-of-12), and count from 0 (datasets') or from 1 (a T-of-T shard
    is there), and a complete split of any of these is not short of anything."""
    have, missing = {}, []
    for name in names:
        m = _SHARD.fullmatch(name)
        if m:  # (stem, total) -> {shard number: how it was written, padding and all}
            have.setdefault((m[1], int(m[3])), {})[int(m[2])] = (len(m[2]), m[3])
    for (stem, total), got in sorted(have.items()):
        first = 1 if total in got else 0
        width, said_total = next(iter(got.values()))
        missing += [f"{stem}-{i:0{width}d}-of-{said_total}.parquet" for i in range(first, first + total)
                    if i not in got]
    return missing


def hub_dataset_folder(spec: str, cache_dir=None, split: str = SPLIT) -> Path:
    """--data owner/name[/config]: the train split's (or `split`'s) .parquet files of the config (or of the split
    named, in a repo of one config: train_files), fetched (or taken from the local Hub cache) and linked into a
    folder of their own, <Hub cache>/tritongpt-datasets/owner--name/config/split (the Hub's snapshot folder may
    hold other splits' files, fetched by `datasets`). -> that folder."""
    try:
        from huggingface_hub import constants, hf_hub_download
    except ImportError:
        raise UserError(f"{spec}: fetching a Hub dataset needs huggingface_hub (pip install huggingface_hub); or "
                        f"{_PASS_FILES}") from None
    parts = spec.split("/")
    repo, part = "/".join(parts[:2]), (parts[2] if len(parts) == 3 else None)
    try:
        files, snapshot = _repo_files(repo, cache_dir)
        config, split, names = train_files(repo, files, part, split)
        # the Hub's own listing is the repo; a snapshot is what was fetched of it, maybe not all: its shards short of
        # their count would train on part of the split, as if it were all of it
        missing = _missing_shards(names) if snapshot is not None else []
        if missing:
            raise UserError(f"the local Hub cache's snapshot {snapshot} holds part of its {split} split: "
                            f"{len(missing)} shard(s) missing ({_listed(missing, 3)}), never fetched; fetch them "
                            "where the Hub can be reached, or " + _PASS_FILES)
        paths = [Path(hf_hub_download(repo, name, repo_type="dataset", cache_dir=cache_dir)) for name in names]
    except UserError as e:
        raise UserError(f"{spec!r} is no file or folder here, and as a Hugging Face Hub dataset: {e}") from None
    except Exception as e:
        if "HFValidationError" in {c.__name__ for c in type(e).__mro__}:  # refused before any request: not offline
            raise UserError(f"{spec!r} is no file or folder here, nor a valid Hugging Face Hub dataset id: "
                            f"{first_line(e)}") from None
        raise UserError(f"{spec!r} is no file or folder here, and as a Hugging Face Hub dataset: "
                        f"{hub_error(repo, e, _PASS_FILES, dataset=True)}") from None
    folder = Path(cache_dir or constants.HF_HUB_CACHE) / "tritongpt-datasets" / repo.replace("/", "--") / config / split
    wanted = {folder / name for name in names}  # the repo's paths kept: shard names, and their order
    if folder.is_dir():
        for old in folder.rglob("*.parquet"):  # a shard of an earlier revision that this one lacks
            if old not in wanted:
                old.unlink(missing_ok=True)
    for name, path in zip(names, paths):
        _link(path, folder / name)
    note(f"{spec}: the Hugging Face Hub dataset's {split} split ({len(names)} .parquet file(s)), in {folder}")
    return folder
