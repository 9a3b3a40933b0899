"""MAIL/RCPT parameters and the xtext codec."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.envelope import Status
from relay.smtp.params import MailParams, RcptParams, decodeXtext, encodeXtext, mailParams, rcptParams

ALL = frozenset({"SIZE", "8BITMIME", "BINARYMIME", "SMTPUTF8", "DSN", "AUTH"})


@given(st.text(max_size=60))
def test_xtext_round_trip(text):
    encoded = encodeXtext(text) if text.isascii() else None
    if encoded is not None:
        assert all(33 <= ord(c) <= 126 and c != "=" for c in encoded)
        assert decodeXtext(encoded) == text


@pytest.mark.parametrize("bad", ["a=b", "a b", "+4", "+zz", "+4a", "é"])
def test_bad_xtext(bad):
    with pytest.raises(ValueError):
        decodeXtext(bad)


def test_mail_params_all():
    params = (("SIZE", "10"), ("BODY", "8bitmime"), ("SMTPUTF8", None), ("RET", "full"), ("ENVID", "x+2By"))
    result = mailParams(params, ALL, 100)
    assert isinstance(result, MailParams)
    assert (result.size, result.body, result.smtputf8, result.ret, result.envid) == (
        10,
        "8BITMIME",
        True,
        "FULL",
        "x+y",
    )


def test_auth_param_must_be_a_mailbox_or_null():
    assert mailParams((("AUTH", "<>"),), ALL, 100) == MailParams(auth="<>")
    assert mailParams((("AUTH", "u@example.org"),), ALL, 100) == MailParams(auth="u@example.org")
    assert isinstance(mailParams((("AUTH", "nobody"),), ALL, 100), Status)


@pytest.mark.parametrize(
    "params, offered, code",
    [
        ((("SIZE", "101"),), ALL, "552 5.3.4"),
        ((("SIZE", None),), ALL, "501 5.5.4"),
        ((("BODY", "BINARYMIME"),), ALL - {"BINARYMIME"}, "501 5.5.4"),
        ((("RET", "FULL"),), ALL - {"DSN"}, "555 5.5.4"),
        ((("SMTPUTF8", None),), ALL - {"SMTPUTF8"}, "555 5.5.4"),
        ((("XFORWARD", "x"),), ALL, "555 5.5.4"),
        ((("ENVID", "a" * 101),), ALL, "501 5.5.4"),
    ],
)
def test_mail_params_refused(params, offered, code):
    status = mailParams(params, offered, 100)
    assert isinstance(status, Status) and f"{status.code} {status.enhanced}" == code


def test_rcpt_params():
    assert rcptParams((("NOTIFY", "failure,delay"), ("ORCPT", "RFC822;a+2Bb@x.example")), ALL) == RcptParams(
        ("FAILURE", "DELAY"), "rfc822;a+b@x.example"
    )
    for bad in ((("NOTIFY", "NEVER,DELAY"),), (("NOTIFY", "FAILURE,FAILURE"),), (("ORCPT", ";x"),), (("NOTIFY", ""),)):
        assert isinstance(rcptParams(bad, ALL), Status), bad
    assert rcptParams((("NOTIFY", "NEVER"),), ALL - {"DSN"}).code == 555


EVIL_ORCPT = "rfc822;x+0A.+0D+0AMAIL+20FROM:<ceo@relay.localhost>+0D+0ARCPT+20TO:<victim2@example.net>+0D+0ADATA+0D+0A"


@pytest.mark.parametrize(
    "value",
    [EVIL_ORCPT, "rfc822;a+0Db@x.example", "rfc822;a+00b@x", "rfc822;a+7Fb@x", "rfc822;a+1Bb@x", "rfc822;+E9@x"],
)
def test_orcpt_must_decode_to_printable_ascii(value):
    """Its decoded form goes into the DSN's Original-Recipient field: a control character there forges lines."""
    status = rcptParams((("ORCPT", value),), ALL)
    assert isinstance(status, Status)
    assert (status.code, status.enhanced, status.text) == (501, "5.5.4", "Bad ORCPT parameter syntax")


def test_orcpt_may_hold_any_printable_ascii():
    params = rcptParams((("ORCPT", "rfc822;+22john+20doe+22@x.example"),), ALL)
    assert params == RcptParams(None, 'rfc822;"john doe"@x.example')


@pytest.mark.parametrize("value", ["a+0Ab", "a+0D+0Ab", "+00", "a+7F", "+E9"])
def test_envid_must_decode_to_printable_ascii(value):
    status = mailParams((("ENVID", value),), ALL, 100)
    assert isinstance(status, Status) and (status.code, status.enhanced) == (501, "5.5.4")


@given(st.text(st.characters(max_codepoint=255), max_size=30))
def test_every_control_character_is_refused_in_orcpt_and_envid(text):
    encoded = encodeXtext(text)
    envid = mailParams((("ENVID", encoded),), ALL, 100)
    orcpt = rcptParams((("ORCPT", "rfc822;" + encoded),), ALL)
    clean = text.isascii() and text.isprintable()
    assert isinstance(orcpt, RcptParams) == (clean and bool(text))
    assert isinstance(envid, MailParams) == (clean and bool(text) and len(text) <= 100)
