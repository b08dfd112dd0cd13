"""A mutation check of our own: plant known bugs one at a time; fail if the tests miss one.

Each :class:`Mutant` replaces one piece of source text (which must occur exactly
once) by a buggy one, in a copy of the working tree; the tests that cover that
module then run, with the copy first on the import path, in the child processes
they start too. A mutant whose tests still pass has *survived*: the tests would
not notice that bug. ``nox -s mutants`` (``python3 dev.py mutants``) runs every
mutant and exits non-zero naming the survivors; ``-- NAME...`` plants only those,
``-- --list`` lists them.

Why a fixed list rather than mutmut: mutmut plants every operator change it can
find, thousands here, most of them equivalent or of no consequence to a user,
and runs the tests for each: hours on two cores, then a report to sort by hand.
The bugs worth guarding against are few and known (issue #14 names them: a
bound off by one, a wrong HTTP status, a broken stream frame), so each mutant
here is one a user would notice, runs only the narrowest tests that should
catch it, and the verdict is the same on every run.

How the copy is what runs: the project is installed editable, and setuptools'
editable finder sits at the end of ``sys.meta_path``; a folder first on
``PYTHONPATH`` holding ``protoserve/<package>`` (links into the copy) is found
before it, by this process's children and theirs (``python -m protoserve...``).
Before any mutant, a child prints where it imports each package from, and the
canary (a mutant only a server subprocess can show) must be killed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Each package of the ``protoserve`` namespace, and its folder (pyproject.toml's package-dir).
PACKAGES = {
    "server": "server",
    "gateway": "gateway",
    "clients": "clients",
    "common": "common",
    "inference": "gen/protoserve/inference",
    "oip": "gen/protoserve/oip",
    "openai": "gen/protoserve/openai",
}
#: Seconds one mutant's tests may run. A mutant that makes them hang counts as killed:
#: a user notices a hang.
TIMEOUT = 300.0
#: Seconds the unmutated run of every chosen mutant's tests may take.
BASELINE_TIMEOUT = 900.0
#: Each run's pytest output, kept to read after the run (build/ is ignored by git).
LOGS = ROOT / "build" / "mutants"
#: pytest's exit status when a test failed (ExitCode.TESTS_FAILED).
TESTS_FAILED = 1


@dataclass(frozen=True)
class Mutant:
    """A bug: ``old`` replaced by ``new`` in ``file``; ``tests`` must notice it.

    ``tests`` are pytest arguments (files or node ids), cheapest first: pytest
    stops at the first failure. ``noticed`` says what a user would see.
    """

    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    noticed: str


#: Only a server subprocess can show it (the log line a stopped server ends with), so it
#: survives when the tests' children import the installed project instead of the copy.
CANARY = Mutant(
    "canary",
    "server/app.py",
    'log.info("stopped")',
    'log.info("halted")',
    ("tests/e2e/test_shutdown.py::test_signal_when_idle_exits_promptly[SIGTERM]",),
    "a stopped server no longer logs `stopped`",
)

MUTANTS = (
    # Request parameters (server/runtime/params.py, the specs in model.py).
    Mutant(
        "stop-sequences-count",
        "server/runtime/params.py",
        "if high is not None and len(value) > high:",
        "if high is not None and len(value) >= high:",
        ("tests/test_bounds.py",),
        "a request with exactly 8 stop sequences (the limit) is refused",
    ),
    Mutant(
        "stop-sequence-length",
        "server/runtime/params.py",
        "if len(item) > MAX_STOP_SEQUENCE_CHARS:",
        "if len(item) > 4 * MAX_STOP_SEQUENCE_CHARS:",
        ("tests/test_bounds.py",),
        "stop sequences up to 1024 characters are accepted; the limit is 256",
    ),
    Mutant(
        "max-new-tokens-unbounded",
        "server/runtime/model.py",
        "self.max_new_tokens_limit,",
        "None,",
        ("tests/test_bounds.py",),
        "max_new_tokens=1000000 is accepted and runs a million steps",
    ),
    Mutant(
        "temperature-no-minimum",
        "server/runtime/model.py",
        "0.0,\n                10.0,\n",
        "None,\n                10.0,\n",
        ("tests/test_bounds.py",),
        "a negative temperature is not INVALID_ARGUMENT naming the field (the model fails)",
    ),
    Mutant(
        "top-p-above-one",
        "server/runtime/model.py",
        '0.0,\n                1.0,\n                "Nucleus',
        '0.0,\n                None,\n                "Nucleus',
        ("tests/test_bounds.py",),
        "top_p=1.5 is not INVALID_ARGUMENT naming the field (the model fails)",
    ),
    # Generation (server/runtime/generation.py) and sampling (server/models/bytelm.py).
    Mutant(
        "length-checked-before-stop",
        "server/runtime/generation.py",
        "        hit = _first_stop(self._pending, self._stops)\n"
        "        if hit is not None:\n"
        "            self._pending = self._pending[:hit]\n"
        "            return self._finish(tokens, FinishReason.STOP_SEQUENCE)\n"
        "        if self.generated >= self._limit:\n"
        "            return self._finish(tokens, FinishReason.LENGTH)\n",
        "        if self.generated >= self._limit:\n"
        "            return self._finish(tokens, FinishReason.LENGTH)\n"
        "        hit = _first_stop(self._pending, self._stops)\n"
        "        if hit is not None:\n"
        "            self._pending = self._pending[:hit]\n"
        "            return self._finish(tokens, FinishReason.STOP_SEQUENCE)\n",
        ("tests/server/test_generation.py", "tests/test_bounds.py"),
        "a stop sequence completed by the last allowed token is returned, finish LENGTH",
    ),
    Mutant(
        "length-limit-one-late",
        "server/runtime/generation.py",
        "if self.generated >= self._limit:",
        "if self.generated > self._limit:",
        ("tests/server/test_generation.py", "tests/test_bounds.py"),
        "max_new_tokens=N generates N+1 tokens",
    ),
    Mutant(
        "top-p-ignored",
        "server/models/bytelm.py",
        "    if top_p < 1.0:\n",
        "    if top_p < 0.0:\n",
        ("tests/server/test_bytelm.py",),
        "top_p has no effect: the built-in model samples from every token",
    ),
    Mutant(
        "top-p-zero-keeps-nothing",
        "server/models/bytelm.py",
        "    if temperature == 0 or top_p == 0:\n",
        "    if temperature == 0:\n",
        ("tests/test_bounds.py",),
        "top_p 0, inside the advertised range, fails inside the model: INTERNAL (the bug "
        "issue #14 found)",
    ),
    # The scheduler's and the runtime's bounds.
    Mutant(
        "queue-admits-one-more",
        "server/runtime/scheduler.py",
        "if held >= self.max_queue + self.max_active:",
        "if held > self.max_queue + self.max_active:",
        ("tests/server/test_scheduler.py", "tests/server/test_api.py"),
        "a full model queues one request past --max-queue instead of RESOURCE_EXHAUSTED",
    ),
    Mutant(
        "streams-limit-one-more",
        "server/runtime/core.py",
        "if self._streams >= self.max_streams:",
        "if self._streams > self.max_streams:",
        ("tests/server/test_batching.py",),
        "one stream more than --max-streams is served",
    ),
    # Shutdown (server/app.py): the drain ends generations before the grace runs out.
    Mutant(
        "shutdown-ends-unavailable",
        "server/app.py",
        "            self.runtime.stop_generations()\n",
        "",
        ("tests/server/test_drain.py", "tests/e2e/test_shutdown.py"),
        "a stream still running at shutdown ends with an error, not FINISH_REASON_CANCELLED",
    ),
    # The servicer's messages (server/servicer.py).
    Mutant(
        "finish-length-as-end-of-text",
        "server/servicer.py",
        "FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,",
        "FinishReason.LENGTH: pb.FINISH_REASON_END_OF_TEXT,",
        ("tests/server/test_api.py",),
        "a generation cut at max_new_tokens says it reached the end of text",
    ),
    Mutant(
        "usage-total-without-prompt",
        "server/servicer.py",
        "total_tokens=chunk_usage.total_tokens,",
        "total_tokens=chunk_usage.completion_tokens,",
        ("tests/server/test_api.py",),
        "usage.total_tokens leaves out the prompt's tokens",
    ),
    # The gateway's error table (gateway/_errors.py).
    Mutant(
        "http-429-as-503",
        "gateway/_errors.py",
        "grpc.StatusCode.RESOURCE_EXHAUSTED: 429,",
        "grpc.StatusCode.RESOURCE_EXHAUSTED: 503,",
        ("tests/gateway/test_errors.py",),
        "a full queue answers 503 (server down) instead of 429 (slow down)",
    ),
    Mutant(
        "http-404-as-400",
        "gateway/_errors.py",
        "grpc.StatusCode.NOT_FOUND: 404,",
        "grpc.StatusCode.NOT_FOUND: 400,",
        ("tests/gateway/test_errors.py",),
        "an unknown model answers 400 instead of 404",
    ),
    Mutant(
        "no-retry-after-on-429",
        "gateway/_errors.py",
        "_RETRYABLE = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})",
        "_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})",
        ("tests/gateway/test_errors.py",),
        "a 429 carries no Retry-After header",
    ),
    # Stream framing (gateway/_streaming.py) and request ids (common/logs.py).
    Mutant(
        "sse-done-without-blank-line",
        "gateway/_streaming.py",
        'return b"event: done\\ndata: {}\\n\\n"',
        'return b"event: done\\ndata: {}\\n"',
        ("tests/gateway/test_http.py", "tests/clients/test_http_client.py"),
        "an SSE client never sees the `done` event: the stream looks cut off",
    ),
    Mutant(
        "sse-error-as-message",
        "gateway/_streaming.py",
        'return f"event: error\\ndata: {_json(status)}\\n\\n".encode()',
        'return f"event: message\\ndata: {_json(status)}\\n\\n".encode()',
        ("tests/gateway/test_http.py",),
        "an error mid-stream arrives as one more message event",
    ),
    Mutant(
        "ndjson-without-newline",
        "gateway/_streaming.py",
        'return (_json(data) + "\\n").encode()',
        "return _json(data).encode()",
        ("tests/gateway/test_http.py",),
        "an NDJSON stream is one long line of JSON objects",
    ),
    Mutant(
        "request-id-not-echoed",
        "common/logs.py",
        "return given if given is not None and _SANE.match(given) else uuid.uuid4().hex",
        "return uuid.uuid4().hex",
        ("tests/gateway/test_http.py",),
        "the gateway answers a new X-Request-Id instead of the caller's",
    ),
    # gRPC transport limits (server/transport.py).
    Mutant(
        "unary-second-message-ignored",
        "server/transport.py",
        "if await context.read() is not EOF:",
        "if False:",
        ("tests/server/test_transport.py::test_one_message_is_answered_and_a_second_is_refused",),
        "a unary call that sends two messages is answered as if it sent one",
    ),
    Mutant(
        "stream-limit-unset",
        "server/transport.py",
        '("grpc.max_concurrent_streams", config.max_streams_per_connection),',
        '("grpc.max_concurrent_streams", 1 << 30),',
        ("tests/server/test_transport.py::test_streams_past_the_limit_are_refused",),
        "one connection opens as many streams as it likes",
    ),
    # The OpenAI API (server/openai/, server/runtime/params.py).
    Mutant(
        "openai-choices-bound",
        "server/openai/_requests.py",
        "if not 1 <= request.n <= MAX_CHOICES:",
        "if not 1 <= request.n < MAX_CHOICES:",
        ("tests/server/test_openai_service.py::test_n_and_choices_in_all_are_bounded_at_16",),
        "a request for n=16 choices (the limit) is refused",
    ),
    Mutant(
        "top-logprobs-unbounded",
        "server/runtime/params.py",
        "not 0 <= logprobs <= MAX_TOP_LOGPROBS:",
        "not 0 <= logprobs:",
        ("tests/server/test_logprobs.py",),
        "logprobs=1000 is accepted and every token carries a thousand alternatives",
    ),
    # A stream's reader that falls behind (server/runtime/scheduler.py, generation.py).
    Mutant(
        "joined-chunk-loses-text",
        "server/runtime/generation.py",
        '"".join(c.text for c in chunks),',
        "last.text,",
        ("tests/server/test_coalescing.py",),
        "a client that fell behind gets only the last token's text of what it missed",
    ),
    Mutant(
        "joined-read-counted-once",
        "server/runtime/scheduler.py",
        "self._scheduler._consumed(self, len(items))",
        "self._scheduler._consumed(self, 1)",
        ("tests/server/test_coalescing.py",),
        "a stream that fell behind once stays paused for ever: its tokens read are not counted",
    ),
    Mutant(
        "drain-refusal-with-headers",
        "server/transport.py",
        "begin(context, headers=admitted)\n",
        "begin(context, headers=True)\n",
        ("tests/e2e/test_shutdown.py",),
        "a call refused while draining has response headers: no client retries it elsewhere",
    ),
    Mutant(
        "drain-forgets-admitted-calls",
        "server/runtime/core.py",
        "        self._arriving += 1  # counted until release(): a drain waits for it\n",
        "",
        ("tests/server/test_admission.py",),
        "a drain stops while a call it took is still arriving: grpc's stop cancels it",
    ),
)


@dataclass
class Result:
    """How one pytest run ended."""

    verdict: str  # "passed", "failed", "timed out" or "error"
    seconds: float
    log: Path
    failed: list[str]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nox -s mutants --", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="plant only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)
    if args.list:
        for mutant in (CANARY, *MUTANTS):
            print(f"{mutant.name:30} {mutant.file:30} {mutant.noticed}")
        return 0
    known = {m.name: m for m in MUTANTS}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"no mutant {', '.join(unknown)}; --list shows them")
    chosen = [known[n] for n in args.names] if args.names else list(MUTANTS)

    shutil.rmtree(LOGS, ignore_errors=True)
    LOGS.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="protoserve-mutants-") as tmp:
        snapshot = Path(tmp, "snapshot")
        copy_working_tree(snapshot)
        problems = [p for m in (CANARY, *chosen) if (p := check_mutant(m, snapshot))]
        if problems:
            print("The mutant list no longer fits the code:", *problems, sep="\n  ")
            return 2
        tree = Path(tmp, "tree")
        env = child_environment(tree, Path(tmp, "path"))
        fresh_tree(snapshot, tree)
        wrong = wrong_imports(tree, env)
        if wrong:
            print("The tests would not run the copy:", wrong, sep="\n")
            return 2

        tests = list(dict.fromkeys(t for m in (CANARY, *chosen) for t in m.tests))
        print(f"baseline: {len(tests)} test sets on the unmutated copy ...", flush=True)
        baseline = run_pytest(tree, env, tests, LOGS / "baseline.log", BASELINE_TIMEOUT)
        print(f"baseline: {baseline.verdict} in {baseline.seconds:.1f}s", flush=True)
        if baseline.verdict != "passed":
            print(f"The tests fail without any mutant; see {baseline.log}")
            return 2

        survivors, errors = [], []
        for i, mutant in enumerate((CANARY, *chosen)):
            fresh_tree(snapshot, tree)
            plant(mutant, tree)
            result = run_pytest(tree, env, mutant.tests, LOGS / f"{mutant.name}.log", TIMEOUT)
            report(i, len(chosen), mutant, result)
            if result.verdict == "passed":
                if mutant is CANARY:
                    print("The canary survived: the tests' subprocesses do not run the copy.")
                    return 2
                survivors.append(mutant)
            elif result.verdict == "error":
                errors.append(mutant)
    if errors:
        print(f"\n{len(errors)} mutant(s) could not be judged (pytest did not run their tests):")
        for mutant in errors:
            print(f"  {mutant.name}: {LOGS / mutant.name}.log")
    if survivors:
        print(f"\n{len(survivors)} mutant(s) survived: these bugs pass the tests that cover them.")
        for mutant in survivors:
            print(f"  {mutant.name} ({mutant.file}): {mutant.noticed}")
            print(f"    ran {' '.join(mutant.tests)}")
    if survivors or errors:
        return 1
    print(f"\nAll {len(chosen)} mutants were killed.")
    return 0


def copy_working_tree(dest: Path) -> None:
    """The working tree as git sees it: tracked files, and untracked ones it does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is not
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def check_mutant(mutant: Mutant, tree: Path) -> str | None:
    """What makes ``mutant`` unusable on ``tree`` (a stale ``old``, a missing test), or None."""
    path = tree / mutant.file
    if not path.is_file():
        return f"{mutant.name}: no file {mutant.file}"
    found = path.read_text().count(mutant.old)
    if found != 1:
        return f"{mutant.name}: its text occurs {found} times in {mutant.file}, not once"
    try:
        compile(path.read_text().replace(mutant.old, mutant.new), mutant.file, "exec")
    except SyntaxError as error:
        return f"{mutant.name}: the mutated {mutant.file} does not compile: {error}"
    missing = [t for t in mutant.tests if not (tree / t.partition("::")[0]).exists()]
    if missing:
        return f"{mutant.name}: no test file {', '.join(missing)}"
    return None


def child_environment(tree: Path, path: Path) -> dict[str, str]:
    """The tests' environment: ``path`` first on PYTHONPATH, with ``protoserve/<package>``
    linked to each package's folder in ``tree``."""
    namespace = path / "protoserve"
    namespace.mkdir(parents=True)
    for name, folder in PACKAGES.items():
        (namespace / name).symlink_to(tree / folder, target_is_directory=True)
    pythonpath = os.pathsep.join(filter(None, (str(path), os.environ.get("PYTHONPATH"))))
    return {**os.environ, "PYTHONPATH": pythonpath}


def fresh_tree(snapshot: Path, tree: Path) -> None:
    """``tree`` as a new copy of ``snapshot``: nothing of the last mutant or its run left."""
    shutil.rmtree(tree, ignore_errors=True)
    shutil.copytree(snapshot, tree, symlinks=True)


def wrong_imports(tree: Path, env: dict[str, str]) -> str:
    """Each package a child process imports from elsewhere than ``tree``, one a line."""
    code = (
        "import importlib, pathlib\n"
        f"for name in {list(PACKAGES)!r}:\n"
        "    module = importlib.import_module('protoserve.' + name)\n"
        "    print(name, pathlib.Path(module.__file__).resolve().parent)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True
    )
    if proc.returncode:
        return proc.stderr
    found = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    return "\n".join(
        f"  protoserve.{name} from {found.get(name)}"
        for name, folder in PACKAGES.items()
        if found.get(name) != str((tree / folder).resolve())
    )


def plant(mutant: Mutant, tree: Path) -> None:
    path = tree / mutant.file
    path.write_text(path.read_text().replace(mutant.old, mutant.new))


def run_pytest(
    tree: Path, env: dict[str, str], tests: Sequence[str], log: Path, timeout: float
) -> Result:
    """pytest on ``tests`` in ``tree``, stopping at the first failure; output to ``log``."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    started = time.monotonic()
    with log.open("w") as out:
        # A session of its own, so that a hang is ended with every server it started.
        process = subprocess.Popen(
            command, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            status = process.wait(timeout)
        except subprocess.TimeoutExpired:
            status = None
        finally:
            # Whatever the tests left running too (a server they did not stop).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    seconds = time.monotonic() - started
    output = log.read_text(errors="replace")
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
    if status is None:
        verdict = "timed out"
    elif status == 0:
        verdict = "passed"
    elif status == TESTS_FAILED:
        verdict = "failed"
    else:
        verdict = "error"
    return Result(verdict, seconds, log, failed)


def report(index: int, total: int, mutant: Mutant, result: Result) -> None:
    label = {
        "passed": "SURVIVED",
        "failed": "killed",
        "timed out": "killed (hung)",
        "error": "ERROR",
    }[result.verdict]
    where = "canary" if mutant is CANARY else f"{index}/{total}"
    by = f"by {result.failed[0]}" if result.failed else ""
    print(f"[{where:>5}] {mutant.name:30} {label:14} {result.seconds:6.1f}s  {by}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
