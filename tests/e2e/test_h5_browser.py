"""H5 in a real browser: Debian's headless Chromium driven by Playwright, at a 390x844 phone viewport.

Open the h5_url of a real login, see the masked phone and the images, fail an upload and then
upload through the page's form, open another user's link (stay, then switch), log out and land on
the signed-out page; then the error page, and nginx's page for "no process answers". Screenshots of
each step, light and dark, go to test-artefacts/h5/<db>/ (look at them after changing the pages).
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
from PIL import Image as PILImage

from tests.helpers import ROOT

ARTEFACTS = ROOT / "test-artefacts" / "h5"


async def images_loaded(page) -> None:
    """Wait until every <img> has decoded. (Playwright's wait_for_function needs eval, which our CSP forbids.)"""
    for _ in range(100):
        if await page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)"):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("images did not load")


async def snap(page, folder: Path, name: str) -> None:
    """Full-page screenshots of the page as it is, light and dark; the two palettes must differ."""
    backgrounds = set()
    for scheme in ("light", "dark"):
        await page.emulate_media(color_scheme=scheme)
        backgrounds.add(await page.evaluate("getComputedStyle(document.body).backgroundColor"))
        await page.screenshot(path=str(folder / f"{name}-{scheme}.png"), full_page=True)
    await page.emulate_media(color_scheme="light")
    assert len(backgrounds) == 2, f"{name}: no dark palette"


async def box(page, selector: str) -> dict[str, float]:
    found = await page.locator(selector).bounding_box()
    assert found is not None, f"{selector} is not rendered"
    return found


def inside(inner: dict[str, float], outer: dict[str, float]) -> bool:
    return (
        outer["x"] <= inner["x"]
        and inner["x"] + inner["width"] <= outer["x"] + outer["width"]
        and outer["y"] <= inner["y"]
        and inner["y"] + inner["height"] <= outer["y"] + outer["height"]
    )


def png(color: tuple[int, int, int], size=(600, 400)) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.gen_test(timeout=180)
async def test_the_h5_journey_in_chromium(api, user, outbox, database_url, tmp_path, chromium):
    from playwright.async_api import expect

    folder = ARTEFACTS / ("mysql" if database_url.startswith("mysql") else "sqlite")
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.png"):
        stale.unlink()
    for color in ((220, 40, 40), (40, 160, 60)):
        uploaded = await api.post("/images", body=png(color), token=user.token, headers={"Content-Type": "image/png"})
        assert uploaded.code == 201
    login = await api.post("/users/login", {"phone": "18866668888", "password": "demo123456"})
    assert login.code == 200
    other = await api.register(outbox, phone="18866669999")
    assert other.code == 201

    async def other_link() -> str:
        return (await api.post("/h5/ticket", token=other.json["token"])).json["h5_url"]

    new_image = tmp_path / "from-the-phone.png"
    new_image.write_bytes(png((30, 90, 220)))
    not_an_image = tmp_path / "holiday-notes.png"
    not_an_image.write_bytes(b"these are notes, not pixels\n" * 20)

    async with chromium() as browser:
        context = await browser.new_context(
            viewport={"width": 390, "height": 844},
            device_scale_factor=2,
            is_mobile=True,
            has_touch=True,
            color_scheme="light",
        )
        page = await context.new_page()

        # 1. The WebView opens the h5_url: the ticket is exchanged and leaves the address bar.
        await page.goto(login.json["h5_url"])
        assert page.url.endswith("/h5/home") and "ticket" not in page.url
        assert await page.text_content("#phone") == "188****8888"
        await images_loaded(page)
        assert await page.locator("#grid img").count() == 2
        # The file picker is a label styled as a button; the input itself is visually hidden but
        # stays the label's control (screen readers, keyboard focus).
        await snap(page, folder, "1-home")
        picker, label = await box(page, "#file"), await box(page, "#choose")
        assert picker["width"] <= 1 and picker["height"] <= 1
        assert await page.locator("#choose").is_visible() and label["height"] >= 44
        assert await page.get_by_label("Choose image").get_attribute("id") == "file"
        await page.keyboard.press("Tab")  # past the Log out button, the picker takes the focus...
        await page.keyboard.press("Tab")
        assert await page.evaluate("document.activeElement.id") == "file"
        # ...and its label shows it.
        assert await page.evaluate("getComputedStyle(document.getElementById('choose')).outlineStyle") == "solid"

        # 2. A failed upload: the message stays in the upload form, right under the button.
        await page.set_input_files("#file", str(not_an_image))
        assert await page.text_content("#file-name") == "holiday-notes.png"
        await page.click("#send")
        await expect(page.locator("#status")).to_have_class("message is-error", timeout=20000)
        # The error came as JSON, like a success: the page names what went wrong by its code.
        await expect(page.locator("#status")).to_have_text("Only JPEG, PNG, GIF and WebP images can be uploaded.")
        status, form, send = await box(page, "#status"), await box(page, "#upload"), await box(page, "#send")
        assert inside(status, form)
        assert 0 <= status["y"] - (send["y"] + send["height"]) <= 16 and status["height"] < 60
        assert status["x"] == send["x"]  # aligned with the form, not centred like a page
        await snap(page, folder, "2-upload-failed")

        # 3. Upload through the page's form: progress, then the new image without a reload.
        await page.set_input_files("#file", str(new_image))
        await page.click("#send")
        await expect(page.locator("#status")).to_have_text("Uploaded.", timeout=20000)
        assert await page.locator("#grid img").count() == 3
        assert await page.text_content("#count") == "3"
        assert await page.text_content("#file-name") == "No image chosen"  # the form was reset
        await images_loaded(page)
        assert page.url.endswith("/h5/home")  # no reload happened
        await snap(page, folder, "3-uploaded")

        # The page at the narrowest common phone width.
        await page.set_viewport_size({"width": 360, "height": 780})
        assert await page.evaluate("document.documentElement.scrollWidth") <= 360  # no sideways scrolling
        await page.screenshot(path=str(folder / "4-home-360px.png"), full_page=True)
        await page.set_viewport_size({"width": 390, "height": 844})

        # 4. Another user's link: the page asks, and staying keeps this session.
        await page.goto(await other_link())
        assert await page.text_content("#link-phone") == "188****9999"
        assert await page.text_content("#current-phone") == "188****8888"
        await snap(page, folder, "5-another-account")
        await page.click("#stay")
        await page.wait_for_url("**/h5/home")
        assert await page.text_content("#phone") == "188****8888"
        # ...and switching is the form post (its XSRF token, Chromium's Origin header) that says so.
        await page.goto(await other_link())
        await page.click("#switch")
        await page.wait_for_url("**/h5/home")
        assert await page.text_content("#phone") == "188****9999"

        # 5. Log out: the form post (with its XSRF token) ends the session and says so; no 401.
        await page.click("#logout")
        await page.wait_for_url("**/h5/home?signed_out=1")
        assert await page.text_content("h1") == "You have signed out"
        await snap(page, folder, "6-signed-out")
        response = await page.reload()
        assert response.status == 200 and await page.text_content("h1") == "You have signed out"

        # 6. An error page (here: no session) says what to do in words; no status number shown.
        response = await page.goto(page.url.split("?")[0])
        assert response.status == 401
        assert await page.get_attribute("main", "data-status") == "401"
        assert await page.text_content("h1") == "Open this page from the app"
        assert "401" not in await page.inner_text("body")
        await snap(page, folder, "7-error")

        # 7. nginx's page while no process answers (test_production.py serves it from nginx): the
        # same look, its stylesheet found.
        await page.goto(page.url.replace("/h5/home", "/static/h5/unavailable.html"))
        assert await page.evaluate("getComputedStyle(document.querySelector('.card')).borderRadius") == "14px"
        assert "503" not in await page.inner_text("body")
        await snap(page, folder, "8-unavailable")
    assert (await api.get("/images", token=user.token)).json["images"][0]["width"] == 600
