"""demo/common/h5/rules.py without HTTP: ``H5`` driven directly, on SQLite and MariaDB."""

from __future__ import annotations

import pytest

from demo.common.accounts import queries as accounts
from demo.common.accounts import tokens
from demo.common.errors import Unauthorized
from demo.common.h5.rules import SwitchOffer
from demo.common.infra.ratelimit import Window

gen_test = pytest.mark.gen_test(timeout=60)


async def signed_in(app, phone: str, n: str):
    """A user's app session (without a password check: accounts.register's unit); its Principal."""
    now = app.services.clock.now()
    token, token_hash = tokens.new_secret()
    grant = accounts.NewGrant(token_hash, now.replace(year=now.year + 1), n * 64, now)
    await app.services.db.run(accounts.register, f"pub-{n}", phone, "hash", Window("k", 1, 60), now, grant, now)
    return await app.services.accounts.authenticate(token)


@gen_test
async def test_a_ticket_signs_the_webview_in_once(app):
    h5 = app.services.h5
    principal = await signed_in(app, "+8618866668888", "a")
    ticket = await h5.issue_ticket(principal)
    cookie = await h5.exchange(ticket)
    assert isinstance(cookie, str)
    visitor = await h5.authenticate(cookie)
    assert (visitor.session_id, visitor.phone, visitor.user_id) == (
        principal.session_id,
        principal.phone,
        principal.user_id,
    )
    with pytest.raises(Unauthorized):
        await h5.exchange(ticket)  # spent
    with pytest.raises(Unauthorized):
        await h5.exchange("not-a-ticket")
    app.services.clock.advance(h5.rules.session_ttl)
    with pytest.raises(Unauthorized):
        await h5.authenticate(cookie)  # expired


@gen_test
async def test_home_counts_visits(app):
    h5 = app.services.h5
    cookie = await h5.exchange(await h5.issue_ticket(await signed_in(app, "+8618866668888", "a")))
    _, page = await h5.visit_home(cookie)
    assert (page["masked_phone"], page["visit_count"], page["images"]) == ("188****8888", 1, [])
    assert page["member_since"].endswith("Z") and page["last_login_at"] == page["member_since"]
    assert (await h5.visit_home(cookie))[1]["visit_count"] == 2
    with pytest.raises(Unauthorized):
        await h5.visit_home(None)


@gen_test
async def test_another_users_link_offers_a_switch_and_logout_ends_the_session(app):
    h5 = app.services.h5
    mine = await h5.exchange(await h5.issue_ticket(await signed_in(app, "+8618866668888", "a")))
    offer = await h5.exchange(await h5.issue_ticket(await signed_in(app, "+8613900000000", "b")), mine)
    assert isinstance(offer, SwitchOffer)
    assert (offer.link_phone, offer.current_phone) == ("139****0000", "188****8888")
    current = await h5.authenticate(mine)  # still signed in as before
    theirs = await h5.switch(offer.ticket, current)
    with pytest.raises(Unauthorized):
        await h5.authenticate(mine)
    visitor = await h5.authenticate(theirs)
    assert visitor.phone == "+8613900000000"
    await h5.logout(visitor)
    with pytest.raises(Unauthorized):
        await h5.authenticate(theirs)
