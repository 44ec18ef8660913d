"""H5 in a real browser: Debian's headless Chromium driven by Playwright, at a 390x844 phone viewport.

Open the h5_url of a real login, see the masked phone and the images, upload through the page's
form, open another user's link (stay, then switch), log out and land on the 401 page. Screenshots
of each step go to test-artefacts/h5/<db>/.
"""
from __future__ import annotations

import asyncio
import io
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image as PILImage

CHROMIUM = "/usr/bin/chromium"
ARTEFACTS = Path(__file__).resolve().parent.parent / "test-artefacts" / "h5"
# The flags Chromium needs as root in a container with no outside network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]

if not (os.path.exists(CHROMIUM) and shutil.which(CHROMIUM)):
    if os.environ.get("DEMO_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"DEMO_REQUIRE_BROWSER=1 but {CHROMIUM} is missing (apt-get install chromium)")
    pytest.skip(f"{CHROMIUM} not installed", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.async_api")
async_playwright, expect = playwright_api.async_playwright, playwright_api.expect


async def images_loaded(page) -> None:
    """Wait until every <img> has decoded. (Playwright's wait_for_function needs eval, which our CSP forbids.)"""
    for _ in range(100):
        if await page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)"):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("images did not load")


def png(color: tuple[int, int, int], size=(600, 400)) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.gen_test(timeout=120)
async def test_the_h5_journey_in_chromium(api, user, outbox, database_url, tmp_path):
    folder = ARTEFACTS / ("mysql" if database_url.startswith("mysql") else "sqlite")
    folder.mkdir(parents=True, exist_ok=True)
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

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2,
                                                is_mobile=True, has_touch=True)
            page = await context.new_page()

            # 1. The WebView opens the h5_url: the ticket is exchanged and leaves the address bar.
            await page.goto(login.json["h5_url"])
            assert page.url.endswith("/h5/home") and "ticket" not in page.url
            assert await page.text_content("#phone") == "188****8888"
            await images_loaded(page)
            assert await page.locator("#grid img").count() == 2
            await page.screenshot(path=str(folder / "1-home.png"), full_page=True)

            # 2. Upload through the page's form: progress, then the new image without a reload.
            await page.set_input_files("#file", str(new_image))
            await page.click("#send")
            await expect(page.locator("#status")).to_have_text("Uploaded.", timeout=20000)
            assert await page.locator("#grid img").count() == 3
            assert await page.text_content("#count") == "3"
            await images_loaded(page)
            assert page.url.endswith("/h5/home")  # no reload happened
            await page.screenshot(path=str(folder / "2-uploaded.png"), full_page=True)

            # The page at the narrowest common phone width, and in dark mode (for the record).
            await page.set_viewport_size({"width": 360, "height": 780})
            assert await page.evaluate("document.documentElement.scrollWidth") <= 360  # no sideways scrolling
            await page.screenshot(path=str(folder / "3-home-360px.png"), full_page=True)
            await page.emulate_media(color_scheme="dark")
            await page.screenshot(path=str(folder / "4-home-dark.png"), full_page=True)
            await page.emulate_media(color_scheme="light")

            # 3. Another user's link: the page asks, and staying keeps this session.
            await page.goto(await other_link())
            assert await page.text_content("#link-phone") == "188****9999"
            assert await page.text_content("#current-phone") == "188****8888"
            await page.screenshot(path=str(folder / "5-another-account.png"), full_page=True)
            await page.click("#stay")
            await page.wait_for_url("**/h5/home")
            assert await page.text_content("#phone") == "188****8888"
            # ...and switching is the form post (its XSRF token, Chromium's Origin header) that says so.
            await page.goto(await other_link())
            await page.click("#switch")
            await page.wait_for_url("**/h5/home")
            assert await page.text_content("#phone") == "188****9999"

            # 4. Log out: the form post (with its XSRF token) ends the session; the 401 page follows.
            await page.click("#logout")
            await page.wait_for_url("**/h5/home")
            assert await page.text_content("h1") == "Open this page from the app"
            await page.screenshot(path=str(folder / "6-logged-out.png"), full_page=True)
            response = await page.reload()
            assert response.status == 401
        finally:
            await browser.close()
    assert (await api.get("/images", token=user.token)).json["images"][0]["width"] == 600
