"""The decode pixel budget waits instead of refusing at once: a multipart request whose images each fit the budget,
but not together, decodes them one after another (it got 503 + Retry-After on an idle server, for ever), and a
reservation that does not fit waits a short bounded time for other decodes to end before its 503."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import fake_runtime
import pytest
from PIL import Image

from models.bundle import read_manifest
from models.preprocessing import copied_pixels
from serve.imaging import decode_weight
from serve.workpool import Busy, Deferred, Holder, PixelBudget


def _photo(w: int, h: int) -> bytes:
    """A large progressive JPEG of few bytes (a smooth gradient): 2 budget pixels a pixel, and decoding takes long
    enough that two files sent together decode at the same time."""
    img = Image.merge("RGB", [Image.linear_gradient("L").resize((w, h)), Image.linear_gradient("L").rotate(90)
                              .resize((w, h)), Image.new("L", (w, h), 128)])
    buf = io.BytesIO()
    img.save(buf, "JPEG", progressive=True, quality=80)
    return buf.getvalue()


def test_a_request_with_two_images_that_fit_the_budget_only_one_at_a_time_is_answered(tmp_path):
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.settings import Settings

    bundle = fake_runtime.write_bundle(tmp_path / "fake")
    w, h = 2000, 1500
    photo = _photo(w, h)
    weight = decode_weight(Image.open(io.BytesIO(photo)))
    cost = w * h * weight + copied_pixels(w, h, read_manifest(bundle).preprocessing)
    budget = cost * 3 // 2  # each image fits, two together do not
    assert weight == 2 and len(photo) < 100_000 and cost < budget < 2 * cost
    with fake_runtime.registered():
        settings = Settings(models=[f"fake={bundle}"], backend="fake", access_log=False, jpeg_draft="never",
                            decode_threads=2, decode_budget_pixels=budget, max_image_pixels=budget)
        with TestClient(create_app(settings)) as c:
            files = [("file", (f"{i}.jpg", photo, "image/jpeg")) for i in range(3)]
            # The request's files ran on both decode threads at once: always 503, never 200. Without any wait for
            # others' budget (wait_s 0), they still decode: the request never waits on its own.
            for wait_s in (2.0, 2.0, 0.0, 0.0):
                c.app.state.pixel_budget.wait_s = wait_s
                r = c.post("/v1/models/fake/classify", files=files)
                assert r.status_code == 200, r.text
                answers = r.json()
                assert len(answers) == 3 and _same(answers[0], answers[1]) and _same(answers[0], answers[2])
                assert c.app.state.pixel_budget.used == 0  # every reservation given back
            one = c.post("/v1/models/fake/classify", content=photo, headers={"content-type": "image/jpeg"})
            assert one.status_code == 200 and _same(one.json(), answers[0])
            # A bad image among them is still named, whichever decoded first.
            r = c.post("/v1/models/fake/classify", files=[*files[:2], ("file", ("bad.jpg", b"nope", "image/jpeg"))])
            assert r.status_code == 400 and r.json()["error"].startswith("bad.jpg: ")
            assert c.app.state.pixel_budget.used == 0


def _same(a: dict, b: dict) -> bool:
    """The same answer up to float rounding: BLAS kernels (AVX2 more than AVX-512) round by batch size and row."""
    pa, pb = a["predictions"], b["predictions"]
    ranked = [(p["label"], p["index"]) for p in pa] == [(p["label"], p["index"]) for p in pb]
    return (a["model"] == b["model"] and ranked
            and all(abs(p["score"] - q["score"]) <= 1e-6 for p, q in zip(pa, pb, strict=True)))


def _hold(budget: PixelBudget, pixels: int, seconds: float) -> threading.Thread:
    """Another decode holding `pixels` for `seconds`, from a thread of its own (started once it holds them)."""
    held = threading.Event()

    def run() -> None:
        with budget.reserve(pixels):
            held.set()
            time.sleep(seconds)

    t = threading.Thread(target=run)
    t.start()
    assert held.wait(5)
    return t


def test_a_reservation_waits_for_another_holder_to_release_within_the_bound():
    budget = PixelBudget(100, wait_s=5.0)
    other = _hold(budget, 80, 0.2)
    t0 = time.monotonic()
    with budget.reserve(50):
        waited = time.monotonic() - t0
        assert budget.used == 50
    other.join()
    assert 0.1 < waited < 4 and budget.used == 0


def test_a_reservation_that_does_not_fit_within_the_bound_is_busy():
    budget = PixelBudget(100, wait_s=0.2)
    other = _hold(budget, 80, 0.5)
    t0 = time.monotonic()
    with pytest.raises(Busy, match=r"decode budget is in use \(80 of its 100 pixels: .*\); this image needs 50"):
        with budget.reserve(50):
            pass
    assert time.monotonic() - t0 > 0.15  # it waited; Busy before the holder let go at 0.5 s
    other.join()
    assert budget.used == 0


def test_a_reservation_never_waits_for_budget_its_caller_holds():
    budget = PixelBudget(100, wait_s=5.0)
    # The same thread (a nested reservation) is refused at once, as before.
    t0 = time.monotonic()
    with budget.reserve(80), pytest.raises(Busy):
        with budget.reserve(50):
            pass
    # So is a job running on the event loop (an inline decode): waiting there would stall every request.
    other = _hold(budget, 80, 0.3)

    async def inline() -> None:
        with budget.reserve(50):
            pass

    with pytest.raises(Busy):
        asyncio.run(inline())
    # A request's image that does not fit beside its own other images is deferred at once, not made to wait.
    own = Holder()
    other.join()
    results: list[BaseException | None] = []
    with budget.reserve(80, own):
        worker = threading.Thread(target=lambda: results.append(_try(budget, 50, own)))
        worker.start()
        worker.join()
    assert isinstance(results[0], Deferred) and own.held == 0 and budget.used == 0
    assert time.monotonic() - t0 < 2  # only the join waited for the other holder, never a reservation


def _try(budget: PixelBudget, pixels: int, holder: Holder) -> BaseException | None:
    try:
        with budget.reserve(pixels, holder):
            return None
    except (Busy, Deferred) as exc:
        return exc
