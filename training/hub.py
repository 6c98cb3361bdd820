"""Hugging Face Hub ids wherever a model or tokenizer is named (model.path, model.init_from,
data.tokenizer, distill.teacher, the tools' inputs): a name that exists on disk is a local path;
otherwise `org/name` or `org/name@revision` is a Hub id, resolved by huggingface_hub's
`snapshot_download` to its snapshot directory in the Hub cache (HF_HOME / HF_HUB_CACHE, HF_TOKEN,
HF_HUB_OFFLINE as huggingface_hub reads them). Every loader keeps taking a local directory.

    lmforge train configs/sft.yaml model.init_from=HuggingFaceTB/SmolLM2-135M-Instruct model.revision=main
    HF_HUB_OFFLINE=1 lmforge export org/tiny@v1 --format gguf --out tiny.gguf    # from the cache only

Preflight resolves once per node under a file lock in data.cache_dir; the launcher's driver then
pins each id to the commit it resolved (`org/name@<sha>`), so the ranks find that snapshot in the
cache without asking the Hub and every rank loads the same commit.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .config import Config, ConfigError

HUB_KEYS = ("model.path", "model.init_from", "data.tokenizer", "distill.teacher")
# huggingface_hub's repo-id rules (validate_repo_id) with an optional @revision (branch, tag or commit).
_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# Weight formats the PyTorch loaders never read: not downloaded with a model.
_IGNORE = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "*.onnx_data", "*.gguf", "*.tflite", "*.mlmodel", "onnx/*",
           "openvino/*", "coreml/*"]


def parse(name: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) if `name` has the form of a Hub id, else None."""
    m = _ID.match(name)
    if m is None or ".." in name:
        return None
    return m["repo"], m["rev"]


def is_hub_id(name: str | None) -> bool:
    """`name` is read as a Hub id: not a path on this machine, and shaped org/name[@rev]."""
    return bool(name) and not Path(name).expanduser().exists() and parse(name) is not None


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve(name: str, key: str, revision: str | None = None) -> Path:
    """`name` (the value of config key or tool argument `key`) → a local directory: itself if it
    exists, else the Hub snapshot of `org/name[@rev]` (`revision`: model.revision). ConfigError,
    naming the id and the cache directory, if it cannot be had."""
    local = Path(name).expanduser()
    if local.exists():
        if revision:
            raise ConfigError(f"model.revision={revision} is for a Hub id, and {key}={name} is a local path")
        return local
    parsed = parse(name)
    if parsed is None:
        raise ConfigError(f"{key}: {name} is not a directory and not a Hub id (org/name or org/name@revision)")
    repo, rev = parsed
    if rev and revision and rev != revision:
        raise ConfigError(f"{key}={name} names revision {rev} and model.revision={revision}: set one")
    rev = rev or revision
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    ident = f"{repo}@{rev}" if rev else repo
    offline = constants.HF_HUB_OFFLINE
    # A commit never changes: a cached one needs no Hub (the ranks get pinned commits, hub.resolve_ids).
    cache_first = offline or bool(rev and _COMMIT.match(rev))
    try:
        try:
            return Path(snapshot_download(repo, revision=rev, ignore_patterns=_IGNORE, local_files_only=cache_first))
        except LocalEntryNotFoundError:
            if offline or not cache_first:
                raise
            return Path(snapshot_download(repo, revision=rev, ignore_patterns=_IGNORE))  # a commit not cached yet
    except LocalEntryNotFoundError:
        raise ConfigError(f"{key}: {ident} is not a local directory, and as a Hub id it is not in the Hub cache "
                          f"{cache_dir()}{' (HF_HUB_OFFLINE is set)' if offline else ' and the Hub cannot be reached'}"
                          f": download it there first (`hf download {repo}"
                          f"{f' --revision {rev}' if rev else ''}`) or run online") from None
    except GatedRepoError:
        raise ConfigError(f"{key}: {ident} is gated on the Hub: accept its terms and set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise ConfigError(f"{key}: the Hub repository {repo} has no revision {rev}") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{key}: {ident} is not a local directory and no Hub repository (or a private one: set "
                          "HF_TOKEN)") from None
    except HfHubHTTPError as e:
        raise ConfigError(f"{key}: {ident}: the Hub answered {e}") from None


def check_remote_code(path: Path, key: str, trusted: bool) -> None:
    """A model whose config.json maps its classes to code in the repository (`auto_map`) runs that
    code on load: refused unless model.trust_remote_code is set."""
    conf = path / "config.json"
    if trusted or not conf.is_file():
        return
    auto_map = json.loads(conf.read_text()).get("auto_map")
    if auto_map:
        what = ("lmforge loads a teacher with transformers' own classes only" if key == "distill.teacher" else
                "set model.trust_remote_code=true if you trust that repository")
        raise ConfigError(f"{key}: {path} ships its own model code (config.json auto_map: "
                          f"{', '.join(sorted(auto_map))}), which loading it would run: {what}")


def _get(tree: dict, key: str):
    section, name = key.split(".")
    return tree[section][name]


def _resolved(cfg: Config) -> dict[str, tuple[str, Path]]:
    """key → (Hub repo id, snapshot directory) for each of HUB_KEYS that names a Hub id (a name not
    on disk that is no Hub id either is refused); every model directory checked for remote code."""
    tree = cfg.to_dict()
    ids = {key: name for key in HUB_KEYS if (name := _get(tree, key)) and not Path(name).expanduser().exists()}
    out = {}
    if ids:
        from filelock import FileLock

        # One rank per node asks the Hub (or downloads); the others find the snapshot cached.
        lock = cfg.data.resolved_cache_dir() / "hub.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lock)):
            for key, name in ids.items():
                revision = cfg.model.revision if key.startswith("model.") else None
                snapshot = resolve(name, key, revision)  # refuses a name that is no Hub id
                out[key] = parse(name)[0], snapshot
    for key in ("model.path", "model.init_from", "distill.teacher"):
        value = _get(tree, key)
        if value:
            check_remote_code(out[key][1] if key in out else Path(value).expanduser(), key,
                              cfg.model.trust_remote_code and key != "distill.teacher")
    if cfg.model.revision and not any(k.startswith("model.") for k in out):
        raise ConfigError(f"model.revision={cfg.model.revision} is for a Hub id in model.path or model.init_from")
    return out


def _with(cfg: Config, values: dict[str, str]) -> Config:
    if not values:
        return cfg
    tree = cfg.to_dict()
    for key, value in values.items():
        section, name = key.split(".")
        tree[section][name] = value
    if any(k.startswith("model.") for k in values):
        tree["model"]["revision"] = None  # now in the value itself
    return Config.model_validate(tree)


def resolve_ids(cfg: Config) -> tuple[Config, Config]:
    """(cfg with every Hub id replaced by its snapshot directory, for the loaders; cfg with every
    Hub id pinned to the commit it resolved to, `org/name@<sha>`, for ranks started elsewhere)."""
    found = _resolved(cfg)
    local = _with(cfg, {key: str(snapshot) for key, (_, snapshot) in found.items()})
    # The Hub cache names a snapshot directory by its commit (models--org--name/snapshots/<sha>).
    pinned = _with(cfg, {key: f"{repo}@{snapshot.name}" for key, (repo, snapshot) in found.items()})
    return local, pinned


def tool_input(path: str, arg: str) -> str:
    """A tool's model argument `arg`: a Hub id becomes its snapshot directory; anything else is
    left to the tool (which names what is wrong with it)."""
    return str(resolve(path, arg)) if is_hub_id(path) else path
