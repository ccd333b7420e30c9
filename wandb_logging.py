"""Weights & Biases for the launcher: settings from flags and ``WANDB_*`` variables, one run per run dir.

Only the launcher imports this module, and wandb itself is imported only when a run starts in ``online`` or
``offline`` mode: peers never load wandb. ``RUN_DIR/wandb.json`` remembers the wandb run id and the last round
logged, so a resumed run (same run dir) continues the same wandb run and logs each round exactly once.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import string
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

logger = logging.getLogger("mar_fl.wandb")

MODES = ("online", "offline", "disabled")
# what WANDB_MODE may say besides the three modes (wandb's own older spellings)
MODE_ALIASES = {"dryrun": "offline", "run": "online"}
DEFAULT_PROJECT = "mar-fl"
DEFAULT_JOB_TYPE = "train"
STATE_FILE = "wandb.json"


class WandbStartError(RuntimeError):
    """``--wandb online|offline`` was asked for but wandb could not start (reported as one line, exit 2)."""


@dataclass(frozen=True)
class WandbSettings:
    """What ``wandb.init`` is given; ``mode_source`` says where the mode came from (for error messages)."""

    mode: str
    project: str
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: Tuple[str, ...] = ()
    job_type: str = DEFAULT_JOB_TYPE
    name: Optional[str] = None
    mode_source: str = "flag"  # or "WANDB_MODE", or "default"

    def mode_text(self) -> str:
        """``--wandb MODE`` as an error message names it, with where the mode came from if not the flag."""
        origin = {"flag": "", "default": " (the default: an API key is configured)"}
        return f"--wandb {self.mode}" + origin.get(self.mode_source, f" (from {self.mode_source})")


def default_mode(env: Mapping[str, str], netrc_path: Optional[str] = None) -> str:
    """``online`` only when an API key is configured (env or ~/.netrc), so offline machines never hang."""
    if env.get("WANDB_API_KEY"):
        return "online"
    try:
        with open(netrc_path or os.path.expanduser("~/.netrc")) as f:
            return "online" if "api.wandb.ai" in f.read() else "offline"
    except OSError:
        return "offline"


def _env_mode(env: Mapping[str, str]) -> Optional[str]:
    """The mode ``WANDB_MODE`` (or ``WANDB_DISABLED=true``) asks for; None when neither is set."""
    if env.get("WANDB_DISABLED", "").lower() in ("true", "1", "yes"):
        return "disabled"
    text = env.get("WANDB_MODE", "").strip()
    mode = MODE_ALIASES.get(text.lower(), text.lower())
    if mode and mode not in MODES:
        raise WandbStartError(f"--wandb not given and WANDB_MODE={text!r} is none of {', '.join(MODES)}")
    return mode or None


def split_tags(text: Optional[str]) -> Tuple[str, ...]:
    """``"a, b,,c"`` → ``("a", "b", "c")``."""
    return tuple(tag.strip() for tag in (text or "").split(",") if tag.strip())


def _first(*values: Optional[str]) -> Optional[str]:
    return next((v for v in values if v), None)


def default_group(env: Mapping[str, str]) -> Optional[str]:
    """Members of one Slurm array (and of one wandb sweep) share a group."""
    if env.get("SLURM_ARRAY_JOB_ID"):
        return f"slurm-{env['SLURM_ARRAY_JOB_ID']}"
    if env.get("WANDB_SWEEP_ID"):
        return f"sweep-{env['WANDB_SWEEP_ID']}"
    return None


def resolve_settings(flags: Mapping[str, Optional[str]], env: Mapping[str, str], *, seed: int, task: str,
                     name: Optional[str] = None) -> WandbSettings:
    """Flags (None: not given) win over ``WANDB_*`` variables, which win over the defaults. A pure function.

    ``flags`` keys: mode, project, entity, group, tags (comma-separated), job_type. The task and the seed are
    always tags, added to those given.
    """
    env_mode = None if flags.get("mode") else _env_mode(env)  # a given flag: WANDB_MODE is not even read
    mode = flags.get("mode") or env_mode or default_mode(env)
    source = "flag" if flags.get("mode") else ("WANDB_MODE" if env_mode else "default")
    given_tags = split_tags(flags.get("tags")) if flags.get("tags") is not None else split_tags(env.get("WANDB_TAGS"))
    auto_tags = (task, f"seed-{seed}")
    return WandbSettings(
        mode=mode, mode_source=source,
        project=_first(flags.get("project"), env.get("WANDB_PROJECT")) or DEFAULT_PROJECT,
        entity=_first(flags.get("entity"), env.get("WANDB_ENTITY")),
        group=_first(flags.get("group"), env.get("WANDB_RUN_GROUP")) or default_group(env),
        tags=tuple(dict.fromkeys(given_tags + auto_tags)),
        job_type=_first(flags.get("job_type"), env.get("WANDB_JOB_TYPE")) or DEFAULT_JOB_TYPE,
        name=_first(env.get("WANDB_NAME"), name),
    )


def new_run_id() -> str:
    """An 8-character id in wandb's alphabet (lowercase letters and digits)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def read_state(run_dir: str) -> Dict[str, Any]:
    """``RUN_DIR/wandb.json``: {"id": ..., "last_round": ...}; {} when there is none (or it is damaged)."""
    try:
        with open(os.path.join(run_dir, STATE_FILE)) as f:
            state = json.load(f)
    except (OSError, ValueError):
        state = {}
    return state if isinstance(state, dict) and isinstance(state.get("id"), str) else {}


def write_state(run_dir: str, state: Dict[str, Any]) -> None:
    """Atomically: a crash mid-write leaves the previous state, never half a file."""
    path = os.path.join(run_dir, STATE_FILE)
    with open(f"{path}.tmp", "w") as f:
        json.dump(state, f)
    os.replace(f"{path}.tmp", path)


class WandbRun:
    """One run's wandb logging: rounds with the round as step (each once), the summary, the end."""

    def __init__(self, run: Any, run_dir: str, state: Dict[str, Any]):
        self.run, self.run_dir = run, run_dir
        self.run_id: str = state["id"]
        self.last_round: int = int(state.get("last_round") or 0)

    def log_rows(self, rows: Sequence[Dict[str, Any]], extra: Optional[Dict[str, Any]] = None) -> None:
        """Log the rows of rounds after the last one logged (a resumed run re-runs rounds it already logged)."""
        for row in rows:
            if row["round"] <= self.last_round:
                continue
            values = {key: value for key, value in row.items() if value is not None}
            self.run.log({**values, **(extra or {})}, step=row["round"])
            self.last_round = row["round"]
        write_state(self.run_dir, {"id": self.run_id, "last_round": self.last_round})

    def update_summary(self, summary: Dict[str, Any]) -> None:
        self.run.summary.update({key: value for key, value in summary.items() if value is not None})

    def finish(self, exit_code: int, *, preempted: bool = False) -> None:
        """End the run; a preempted one (it will be resumed) is marked so, not as crashed."""
        if preempted:
            self.run.mark_preempting()
        self.run.finish(exit_code=exit_code)


def _import_wandb(settings: WandbSettings):
    try:
        import wandb
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install failing inside its import
        raise WandbStartError(f"{settings.mode_text()}: wandb cannot be imported ({e}); install "
                              f"it (requirements.txt) or use --wandb disabled") from None
    return wandb


def _init(wandb: Any, settings: WandbSettings, run_dir: str, config: Dict[str, Any], run_id: str) -> Any:
    """``wandb.init`` with the settings; any failure becomes a one-line WandbStartError."""
    try:
        return wandb.init(project=settings.project, entity=settings.entity, group=settings.group,
                          tags=list(settings.tags), job_type=settings.job_type, name=settings.name, id=run_id,
                          resume="allow", config=config, dir=run_dir, mode=settings.mode)
    except Exception as e:  # noqa: BLE001 - wandb raises many kinds (UsageError, CommError, timeouts)
        message = " ".join(str(e).split()) or type(e).__name__
        raise WandbStartError(f"{settings.mode_text()}: wandb could not start ({message}); "
                              f"use --wandb disabled to run without it") from None


def start(settings: WandbSettings, run_dir: str, config: Dict[str, Any]) -> Optional[WandbRun]:
    """Start (or, with the run dir's saved id, continue) the wandb run; None when disabled.

    Raises WandbStartError when wandb cannot be imported or ``wandb.init`` fails, except that a mode nobody
    asked for (online, the default when an API key is configured) falls back to offline with a warning.
    """
    if settings.mode == "disabled":
        return None
    wandb = _import_wandb(settings)
    state = read_state(run_dir) or {"id": new_run_id(), "last_round": 0}
    try:
        run = _init(wandb, settings, run_dir, config, state["id"])
    except WandbStartError as e:
        if settings.mode_source != "default" or settings.mode != "online":
            raise
        logger.warning("%s; logging offline instead (upload later with wandb sync)", e)
        run = _init(wandb, dataclasses.replace(settings, mode="offline"), run_dir, config, state["id"])
    write_state(run_dir, state)
    return WandbRun(run, run_dir, state)
