"""End-to-end tests of `nox -s protos`: buf lint, buf breaking, regeneration, drift.

Each test runs the real session in a scratch git repository built from this
working tree (protos/, gen/, noxfile.py, buf.yaml, package*.json, pyproject.toml)
with `main` committed, so the outcome does not depend on this repository's
history. All runs share one nox virtualenv (created by the first run, reused
with --no-install afterwards) and this checkout's node_modules (symlinked).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests._tools import missing

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
BUF = ROOT / "node_modules" / ".bin" / "buf"
PROTO = Path("protos/protoserve/inference/v1/inference_service.proto")
GEN_MODULE = Path("gen/protoserve/inference/v1/inference_service_pb2.py")
COPIED = [
    "protos",
    "gen",
    "noxfile.py",
    "buf.yaml",
    "package.json",
    "package-lock.json",
    "pyproject.toml",
    ".gitignore",
]
ENV_AGAINST = "PROTOSERVE_BREAKING_AGAINST"
# Keep the user's git configuration (signing, hooks, default branch) out of it.
GIT_ENV = {
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "protoserve tests",
    "GIT_AUTHOR_EMAIL": "tests@protoserve.invalid",
    "GIT_COMMITTER_NAME": "protoserve tests",
    "GIT_COMMITTER_EMAIL": "tests@protoserve.invalid",
}
# Lines such as `  string state_message = 9;` (the scalar fields of messages).
FIELD = re.compile(
    r"^(?P<head>  (?:optional |repeated )?[a-z0-9]+ )(?P<name>\w+) = (?P<num>\d+);$", re.M
)


def _nox_command() -> list[str] | None:
    if importlib.util.find_spec("nox") is not None:
        return [sys.executable, "-m", "nox"]
    found = shutil.which("nox")
    return [found] if found else None


def _require_tools() -> list[str]:
    """The nox command line; skips (fails on CI) when git, buf or nox is missing."""
    nox = _nox_command()
    absent = [
        what
        for what, ok in [
            ("git", shutil.which("git") is not None),
            (f"buf ({BUF.relative_to(ROOT)}; run `npm ci`)", BUF.exists()),
            ("nox (pip install nox)", nox is not None),
        ]
        if not ok
    ]
    if absent:
        missing("nox -s protos end-to-end tests need " + ", ".join(absent))
    assert nox is not None
    return nox


def git(repo: Path, *args: str) -> str:
    proc = subprocess.run(
        ["git", *args],
        cwd=repo,
        env={**os.environ, **GIT_ENV},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, f"git {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}"
    return proc.stdout.strip()


@dataclass
class NoxRunner:
    command: list[str]
    envdir: Path
    installed: bool = field(default=False)

    def __call__(self, repo: Path, against: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run `nox -s protos` in `repo`; stdout and stderr together in .stdout."""
        env = {**os.environ, **GIT_ENV}
        env.pop(ENV_AGAINST, None)
        if against is not None:
            env[ENV_AGAINST] = against
        args = [*self.command, "--envdir", str(self.envdir), "--reuse-venv=yes", "-s", "protos"]
        if self.installed:  # the first run installed the pinned tools
            args.append("--no-install")
        proc = subprocess.run(
            args,
            cwd=repo,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=600,
            check=False,
        )
        # protoc runs after the installs: from now on the venv has the pinned tools.
        self.installed = self.installed or "grpc_tools.protoc" in proc.stdout
        return proc


@pytest.fixture(scope="module")
def run_nox(tmp_path_factory: pytest.TempPathFactory) -> NoxRunner:
    return NoxRunner(_require_tools(), tmp_path_factory.mktemp("nox-envdir"))


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory, run_nox: NoxRunner) -> Path:
    """A repository whose `main` holds this working tree's protos/, gen/ and tooling."""
    repo = tmp_path_factory.mktemp("origin")
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, repo / name, ignore=ignore)
        elif source.exists():
            shutil.copy2(source, repo / name)
        else:
            assert name == ".gitignore", f"{name} is missing from the working tree"
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "protoserve API")
    return repo


@pytest.fixture
def repo(tmp_path: Path, origin: Path) -> Iterator[Path]:
    """A fresh clone of `origin`, on main, with this checkout's node_modules linked in."""
    clone = tmp_path / "repo"
    git(tmp_path, "clone", "-q", "--branch", "main", str(origin), str(clone))
    (clone / "node_modules").symlink_to(ROOT / "node_modules", target_is_directory=True)
    # A symlink is not a directory to git: `node_modules/` in .gitignore misses it.
    with (clone / ".git" / "info" / "exclude").open("a") as exclude:
        exclude.write("/node_modules\n")
    yield clone


def _edit_first_field(repo: Path, edit: str) -> re.Match[str]:
    """Apply `edit` (a replacement for FIELD) to the first matching field of the proto."""
    path = repo / PROTO
    text = path.read_text()
    match = FIELD.search(text)
    assert match, f"no field line like `  string name = 1;` in {PROTO}"
    path.write_text(text[: match.start()] + match.expand(edit) + text[match.end() :])
    return match


def test_clean_checkout_passes(repo: Path, run_nox: NoxRunner) -> None:
    result = run_nox(repo)
    assert result.returncode == 0, result.stdout
    assert "buf lint" in result.stdout
    assert "buf breaking" in result.stdout
    assert git(repo, "status", "--porcelain", "--", "gen") == ""


def test_hand_edited_stub_fails(repo: Path, run_nox: NoxRunner) -> None:
    stub = repo / GEN_MODULE
    pristine = stub.read_text()
    stub.write_text(pristine + "# edited by hand\n")
    git(repo, "commit", "-q", "-am", "edit a stub by hand")

    result = run_nox(repo)

    assert result.returncode != 0, result.stdout
    assert "gen/ differs from what protos/ generates" in result.stdout
    assert str(GEN_MODULE) in result.stdout
    assert stub.read_text() == pristine  # regenerated over the hand edit


def test_renumbered_field_fails_breaking_check(repo: Path, run_nox: NoxRunner) -> None:
    git(repo, "checkout", "-q", "-b", "renumber")
    field_ = _edit_first_field(repo, r"\g<head>\g<name> = 4242;")
    git(repo, "commit", "-q", "-am", "renumber a field")
    # Regenerate and commit the stubs, so that drift cannot be what fails below.
    regen = run_nox(repo, against="HEAD")
    assert regen.returncode != 0 and "gen/ differs" in regen.stdout, regen.stdout
    git(repo, "commit", "-q", "-am", "regenerate stubs")

    result = run_nox(repo)

    assert result.returncode != 0, result.stdout
    assert "buf breaking (FILE rules, against main" in result.stdout
    assert (
        f'Previously present field "{field_["num"]}" with name "{field_["name"]}"' in result.stdout
    )
    assert "gen/ differs" not in result.stdout
    # The same tree passes when compared with itself: only the breaking check failed.
    assert run_nox(repo, against="HEAD").returncode == 0


def test_lint_reports_camel_case_field_and_missing_comment(repo: Path, run_nox: NoxRunner) -> None:
    path = repo / PROTO
    text = path.read_text()
    snake = next((m for m in FIELD.finditer(text) if "_" in m["name"]), None)
    assert snake, f"no snake_case field in {PROTO}"
    camel = re.sub(r"_([a-z0-9])", lambda m: m[1].upper(), snake["name"])
    text = text[: snake.start()] + f"{snake['head']}{camel} = {snake['num']};" + text[snake.end() :]
    # And one field without its comment: the COMMENTS rules must apply too.
    text, removed = re.subn(r"\n(?:  // [^\n]*\n)+(  string name = 1;)", r"\n\1", text, count=1)
    assert removed == 1
    path.write_text(text)

    result = run_nox(repo)

    assert result.returncode != 0, result.stdout
    assert "buf lint (STANDARD + COMMENTS, see buf.yaml) failed" in result.stdout
    assert f'Field name "{camel}" should be lower_snake_case' in result.stdout
    assert 'Field "name" should have a non-empty comment for documentation' in result.stdout
    assert "google/" not in result.stdout.split("failed:", 1)[1]  # imports are not linted


def test_ref_without_protos_skips_breaking_check(repo: Path, run_nox: NoxRunner) -> None:
    empty_tree = git(repo, "hash-object", "-t", "tree", "-w", os.devnull)
    first_commit = git(repo, "commit-tree", empty_tree, "-m", "before protos/")

    result = run_nox(repo, against=first_commit)

    assert result.returncode == 0, result.stdout
    assert "skipping the breaking-change check" in result.stdout
    assert "has no protos/" in result.stdout


def test_unknown_ref_fails_readably(repo: Path, run_nox: NoxRunner) -> None:
    result = run_nox(repo, against="no-such-branch")

    assert result.returncode != 0, result.stdout
    assert "git ref 'no-such-branch' not found" in result.stdout
    assert ENV_AGAINST in result.stdout
