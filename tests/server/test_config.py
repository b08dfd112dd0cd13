"""Flags, PROTOSERVE_* variables and defaults; model specs."""

from __future__ import annotations

import argparse

import pytest

from protoserve.server.config import ServerConfig, add_arguments, from_arguments
from protoserve.server.runtime.loader import ModelSpecError, load_model_spec


def parse(argv: list[str], env: dict[str, str]) -> ServerConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser, env)
    return from_arguments(parser.parse_args(argv), env)


def test_defaults_are_safe() -> None:
    config = parse([], {})
    assert config.host == "127.0.0.1"  # not every interface unless asked
    assert config.port == 50051 and config.models == ("bytelm",)
    assert config.max_receive_message_bytes == 16 * 1024 * 1024


def test_flag_beats_environment_beats_default() -> None:
    env = {
        "PROTOSERVE_PORT": "6000",
        "PROTOSERVE_SHUTDOWN_GRACE": "2.5",
        "PROTOSERVE_MODELS": "a=bytelm, b=bytelm",
    }
    config = parse([], env)
    assert (config.port, config.shutdown_grace, config.models) == (
        6000,
        2.5,
        ("a=bytelm", "b=bytelm"),
    )
    config = parse(["--port", "7000", "--model", "c=bytelm"], env)
    assert (config.port, config.models) == (7000, ("c=bytelm",))


def test_batch_invariance_is_off_unless_asked_for() -> None:
    # Off: generations decoded together match their lone runs to float rounding.
    assert parse([], {}).batch_invariant is False
    assert parse([], {"PROTOSERVE_BATCH_INVARIANT": "1"}).batch_invariant is True
    assert parse(["--batch-invariant"], {}).batch_invariant is True
    assert (
        parse(["--no-batch-invariant"], {"PROTOSERVE_BATCH_INVARIANT": "yes"}).batch_invariant
        is False
    )


def test_bad_environment_value_names_the_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse([], {"PROTOSERVE_MAX_QUEUE": "lots"})
    assert "PROTOSERVE_MAX_QUEUE" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no.such.module:Model", "cannot import 'no.such.module'"),
        ("json:JSONDecoder", "not a subclass of protoserve.server.Model"),
        ("json:Nothing", "has no 'Nothing'"),
        ("./missing.pt", "does not exist"),
        ("what", "cannot tell what"),
        ("bad name=bytelm", "model name 'bad name'"),
    ],
)
def test_bad_model_specs_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ModelSpecError, match=message):
        load_model_spec(spec)


def test_model_spec_names() -> None:
    assert load_model_spec("bytelm")[0] == "bytelm"
    assert load_model_spec("mine=bytelm")[0] == "mine"
    name, model = load_model_spec("tests.server.models_for_tests:Doubler")
    assert name == "doubler" and type(model).__name__ == "Doubler"
