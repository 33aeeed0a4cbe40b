"""Secrets are masked in text, config trees and log records; what only looks like one is left alone."""

from __future__ import annotations

import logging

import pytest

from tasks.core.redact import MASK, RedactingFilter, redact, redact_tree, secret_name


@pytest.mark.parametrize(
    "text, expected",
    [
        ("https://user:tok3n@mlflow.lab:5000/x", "https://***@mlflow.lab:5000/x"),
        ("ray://tok@head:10001", "ray://***@head:10001"),
        ("open https://u:p@h/#/experiments/1/runs/2", "open https://***@h/#/experiments/1/runs/2"),
        ("s3://b/k?X-Amz-Signature=abc&X-Amz-Date=1", "s3://b/k?X-Amz-Signature=***&X-Amz-Date=1"),
        ("hf:org/set?token=hf_abc", "hf:org/set?token=***"),
        ("hf_token=hf_abc max_new_tokens=128", "hf_token=*** max_new_tokens=128"),
        ("password: hunter2", "password: ***"),
        ("{'aws_secret_access_key': 'AKIA', 'n': 3}", "{'aws_secret_access_key': '***', 'n': 3}"),
        ('{"api_key": "zz"}', '{"api_key": "***"}'),
    ],
)
def test_secrets_are_masked(text, expected):
    assert redact(text) == expected
    assert redact(expected) == expected  # masking twice changes nothing


@pytest.mark.parametrize(
    "text",
    [
        "eval.max_new_tokens=128 eval.perplexity_tokens=512",
        "sqlite:///mlflow.db",
        "s3://bucket/models/x",
        "model=HuggingFaceTB/SmolLM2-135M-Instruct tokenizer=fast",
        "RAY_AUTH_MODE=token",  # a mode's name, not a secret's value
        "user@example.com wrote: a=1,b=2",
        "score token 'À' is 2 tokens",
    ],
)
def test_what_only_looks_secret_is_kept(text):
    assert redact(text) == text


def test_secret_names_are_whole_words():
    assert all(map(secret_name, ["hf_token", "db_password", "X-Amz-Signature", "client_secret", "API_KEY"]))
    assert not any(map(secret_name, ["max_new_tokens", "tokenizer", "score_tokens", "key"]))


def test_config_tree_masks_secret_keys_and_urls():
    tree = {
        "mlflow": {"tracking_uri": "https://a:b@h", "experiment": "compalign"},
        "storage": {"aws_secret_access_key": "AKIA", "session_token": None},
        "data": {"sources": ["hf:x?token=abc", "local.jsonl"]},
        "eval": {"max_new_tokens": 128},
    }
    assert redact_tree(tree) == {
        "mlflow": {"tracking_uri": "https://***@h", "experiment": "compalign"},
        "storage": {"aws_secret_access_key": MASK, "session_token": None},
        "data": {"sources": ["hf:x?token=***", "local.jsonl"]},
        "eval": {"max_new_tokens": 128},
    }
    assert tree["mlflow"]["tracking_uri"] == "https://a:b@h"  # a copy: the real value is still used


def test_log_records_and_tracebacks_are_masked(capsys):
    logger = logging.getLogger("test_redact")
    handler = logging.StreamHandler()
    handler.addFilter(RedactingFilter())
    logger.addHandler(handler)
    try:
        logger.error("cannot reach %s", "https://u:planted-1@host")
        try:
            raise ConnectionError("refused: https://u:planted-2@host")
        except ConnectionError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert "cannot reach https://***@host" in err and "refused: https://***@host" in err
    assert "planted" not in err
