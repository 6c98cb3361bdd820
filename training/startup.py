"""Where a run's start goes, from the command to its first optimizer step: the driver marks its
phases and hands them to the ranks ($LMFORGE_STARTUP), rank 0 adds its own and, after the first
step, logs one line and writes `startup/*` seconds to metrics.jsonl (bench/bench_startup.py reads them).

    lmforge train configs/debug.yaml --nproc 2   # "first step 6.7 s after the command (driver imports 0.2, ...)"

Phases: driver imports (Python and the CLI), forkserver (started before the driver imports torch:
its imports overlap preflight), driver preflight, rank start (a forked rank waits for the
forkserver's imports; an exec'd one imports), process group, rank preflight, model, engine, setup
(data, resume, metrics), eval before (the held-out metric before training), first step. Under Ray:
ray connect instead of forkserver, and rank start includes Ray Train's worker group.

A rank started without lmforge's launcher (torchrun, srun) counts from its own process start.
"""

from __future__ import annotations

import json
import os
import time

ENV = "LMFORGE_STARTUP"


def process_start() -> float:
    """This process's start (epoch seconds, 10 ms resolution) on Linux, else now."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, after the command name
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])  # /proc/stat's btime has a resolution of 1 s
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


class Timeline:
    """Named marks in order; a phase is the time from the previous mark to its own."""

    def __init__(self, start: float, marks: list[tuple[str, float]] | None = None):
        self.start = start
        self.marks = list(marks or [])
        self.reported = False

    @classmethod
    def parse(cls, text: str | None) -> "Timeline":
        """A timeline a launcher handed down (env()'s value), else one from this process's start."""
        try:
            state = json.loads(text)
            return cls(float(state["start"]), [(str(n), float(t)) for n, t in state["marks"]])
        except (TypeError, KeyError, ValueError):
            return cls(process_start())

    def mark(self, name: str) -> None:
        self.marks.append((name, time.time()))

    def env(self) -> dict[str, str]:
        """For the ranks' environment (or, under Ray, their loop config: adopt())."""
        return {ENV: json.dumps({"start": self.start, "marks": self.marks})}

    def phases(self) -> dict[str, float]:
        out, last = {}, self.start
        for name, t in self.marks:
            out[name] = out.get(name, 0.0) + max(0.0, t - last)
            last = t
        return out

    def total(self) -> float:
        return (self.marks[-1][1] if self.marks else time.time()) - self.start

    def describe(self) -> str:
        parts = ", ".join(f"{name} {s:.1f}" for name, s in self.phases().items())
        return f"first step {self.total():.1f} s after the command ({parts})"

    def metrics(self) -> dict[str, float]:
        return {"startup/to_first_step_s": self.total(),
                **{f"startup/{name.replace(' ', '_')}_s": s for name, s in self.phases().items()}}


# One per process: the launcher and the rank code mark the same timeline without passing it around.
TIMELINE = Timeline.parse(os.environ.get(ENV))


def mark(name: str) -> None:
    TIMELINE.mark(name)


def for_rank() -> None:
    """At a rank's start: the timeline its launcher passed down (a forked rank's copy of this module
    was imported in the forkserver, before the launcher's marks existed)."""
    global TIMELINE
    if ENV in os.environ:
        TIMELINE = Timeline.parse(os.environ[ENV])
    mark("rank start")


def adopt(env: dict[str, str], name: str) -> None:
    """A Ray worker's start: the driver's timeline (env()'s, in the loop config), `name` marked now."""
    global TIMELINE
    TIMELINE = Timeline.parse(env.get(ENV))
    mark(name)


def first_step_done(log, metrics, step: int) -> None:
    """After this process's first optimizer step: the one line and the startup/* metrics."""
    if TIMELINE.reported:
        return
    mark("first step")
    TIMELINE.reported = True
    log.info(TIMELINE.describe())
    metrics.log(step, TIMELINE.metrics())
