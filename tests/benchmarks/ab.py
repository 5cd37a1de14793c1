"""A/B of two loopwatch checkouts' `loopwatch run`, side by side with nginx (run on
demand, not by pytest): what a change costs or saves per churn cycle and per HTTP
429 refusal, when a whole `make bench` is too coarse to tell.

    .venv/bin/python -m tests.benchmarks.ab --a CHECKOUT_A --b CHECKOUT_B \\
        [--scenarios churn,refusal,refusal-1013] [--rounds 5] [--seconds 3] [--env-b NAME=VALUE ...]

Each checkout runs with its own virtualenv (CHECKOUT/.venv/bin/python -m loopwatch
run, from CHECKOUT), so A and B may have different compiled data planes; `--env-b`
sets variables in B's environment only (an experiment's switch, PYTHONMALLOC …).
One backend, one load generator and one nginx serve both; the rounds alternate
their order (A, B, nginx, then nginx, B, A). Per operation: the whole process's
CPU (schedstat), the tokio threads' share and the rest (the brain); medians of
the rounds, nginx's CPU per operation from the same rounds, and B ÷ A.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from tests.benchmarks.targets import (
    HOST,
    LoadGen,
    Proc,
    raise_nofile,
    start_backend,
    start_loopwatch,
    start_nginx,
    thread_seconds,
)

DENY = 'policy:\n  deny: ["127.0.0.1/32"]\n  reject_with: {how}\n'
OPERATIONS = {
    "churn": {"op": "churn"},
    "refusal": {"op": "refusal", "expect": "http", "path": "/refuse"},
    # A 101 and a close 1013: the load generator replies to the close, loopwatch waits for it.
    "refusal-1013": {"op": "refusal", "expect": "close", "path": "/refuse"},
}
CONFIGS = {"refusal": DENY.format(how="http-429"), "refusal-1013": DENY.format(how="close-1013")}
FIGURES = ("total", "tokio", "brain", "rate")


def one_round(lg: LoadGen, target: Proc, scenario: str, seconds: float, tag: int) -> dict[str, float]:
    """One load against `target`: its CPU per operation (all, tokio threads, the rest)."""
    pids = target.pids()
    all0, tokio0 = thread_seconds(pids)
    # nginx refuses with its 429 in every refusal scenario: the close-1013's baseline
    # is nginx's 429, as in issue 16's table.
    op = OPERATIONS["refusal" if scenario == "refusal-1013" and target.name == "nginx" else scenario]
    r = lg.call({**op, "workers": 20, "max_s": seconds, "max_ops": 1_000_000, "host": HOST,
                 "port": target.port, "tag": tag}, seconds + 60)  # fmt: skip
    time.sleep(0.3)  # the target finishes the work the last replies started
    all1, tokio1 = thread_seconds(pids)
    ops = r.get("ops", 0)
    if not ops or r.get("failed") or r.get("errors"):
        raise RuntimeError(f"{scenario} against {target.name}: {r}")
    total, tokio = (all1 - all0) / ops * 1e6, (tokio1 - tokio0) / ops * 1e6
    return {"total": total, "tokio": tokio, "brain": total - tokio, "rate": r.get("rate") or 0.0}


def report(scenario: str, results: dict[str, list[dict[str, float]]]) -> None:
    med = {who: {k: statistics.median(x[k] for x in xs) for k in FIGURES} for who, xs in results.items()}
    nginx = med["nginx"]["total"]
    print(f"== {scenario} (µs CPU per operation, medians of {len(results['nginx'])}; nginx {nginx:.1f} µs)")
    for who in ("A", "B"):
        m = med[who]
        print(f"  {who}: total {m['total']:.1f} ({m['total'] / nginx:.2f}× nginx)  tokio {m['tokio']:.1f}"
              f"  brain {m['brain']:.1f}  rate {m['rate']:.0f}/s")  # fmt: skip
    a, b = med["A"], med["B"]
    print(f"  B / A: total {b['total'] / a['total']:.3f}, tokio {b['tokio'] / a['tokio']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, type=Path, help="checkout A (with its .venv)")
    ap.add_argument("--b", required=True, type=Path, help="checkout B (with its .venv)")
    ap.add_argument("--scenarios", default="churn,refusal")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--env-b", action="append", default=[], metavar="NAME=VALUE")
    args = ap.parse_args()
    scenarios = args.scenarios.split(",")
    env_b: dict[str, str | None] = dict(kv.split("=", 1) for kv in args.env_b)
    procs: dict[str, Proc] = {}
    with tempfile.TemporaryDirectory(prefix="lw-ab-") as tmp_dir:
        tmp = Path(tmp_dir)
        backend = start_backend(tmp)
        lg = LoadGen("lg", tmp)
        try:
            procs["nginx"] = start_nginx(tmp, backend.port, raise_nofile())
            for scenario in scenarios:
                config = CONFIGS.get(scenario)
                env: dict[str, str | None]
                for who, root, env in (("A", args.a, {}), ("B", args.b, env_b)):
                    root = root.resolve()
                    # Its own virtualenv, from its own tree: nothing of this checkout's on its path.
                    procs[f"{scenario}-{who}"] = start_loopwatch(
                        tmp, backend.port, f"{scenario}-{who}", config,
                        python=[str(root / ".venv/bin/python")], cwd=root, env={"PYTHONPATH": None, **env},
                    )  # fmt: skip
            results: dict[str, dict[str, list[dict[str, float]]]] = {s: {} for s in scenarios}
            for rnd in range(args.rounds):
                for scenario in scenarios:
                    for who in ("A", "B", "nginx") if rnd % 2 == 0 else ("nginx", "B", "A"):
                        target = procs["nginx" if who == "nginx" else f"{scenario}-{who}"]
                        tag = rnd * 10 + len(who)
                        results[scenario].setdefault(who, []).append(
                            one_round(lg, target, scenario, args.seconds, tag)
                        )
            for scenario in scenarios:
                report(scenario, results[scenario])
        finally:
            lg.stop()
            for proc in procs.values():
                proc.stop()
            backend.stop()


if __name__ == "__main__":
    main()
