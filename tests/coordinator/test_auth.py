"""The bearer-token helpers on their own (the interceptor runs end to end in
tests/e2e/test_production.py): reading the token file, parsing the metadata, comparing."""

from __future__ import annotations

import pytest

from specpipe.coordinator.auth import AuthConfigError, BearerTokenInterceptor, bearer_token, read_token


def test_read_token_strips_the_trailing_newline(tmp_path):
    (tmp_path / "token").write_text("abc123\n")
    assert read_token(tmp_path / "token") == "abc123"


@pytest.mark.parametrize("content, message", [("", "is empty"), ("  \n", "is empty"), ("two words", "whitespace")])
def test_read_token_refuses_bad_files(tmp_path, content, message):
    (tmp_path / "token").write_text(content)
    with pytest.raises(AuthConfigError, match=message):
        read_token(tmp_path / "token")


def test_read_token_names_a_missing_file(tmp_path):
    with pytest.raises(AuthConfigError, match="cannot read the auth token file"):
        read_token(tmp_path / "absent")


@pytest.mark.parametrize(
    "metadata, token",
    [
        ((("authorization", "Bearer abc"),), "abc"),
        ((("authorization", "bearer abc"),), "abc"),
        ((("authorization", "BEARER   abc  "),), "abc"),
        ((("Authorization", b"Bearer abc"),), "abc"),
        ((("x-other", "1"), ("authorization", "Bearer abc")), "abc"),
        ((("authorization", "Basic abc"),), None),
        ((("authorization", "abc"),), None),
        ((), None),
        (None, None),
    ],
)
def test_bearer_token(metadata, token):
    assert bearer_token(metadata) == token


def test_authorized_compares_the_whole_token():
    interceptor = BearerTokenInterceptor("abc")
    assert interceptor.authorized((("authorization", "Bearer abc"),))
    for wrong in ("ab", "abcd", "ABC", "", "abc\x00"):
        assert not interceptor.authorized((("authorization", f"Bearer {wrong}"),)), wrong
