"""The page to try YODA (``python -m yoda_plugin app``): upload checks, one request, and the page in a real browser.

The browser test drives Debian's headless Chromium (packages ``chromium`` and ``chromium-driver``) with Selenium;
``.ci/run`` installs them and sets ``YODA_REQUIRE_BROWSER=1``, so in CI it runs rather than skips.
"""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import cv2
import numpy as np
import pytest

from yoda_plugin.apps import app

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(app.EXAMPLES_DIR, 'astronaut.png')


def write_png(path, image):
    assert cv2.imwrite(str(path), image)
    return str(path)


def small_lr(side=16):
    rgb = cv2.cvtColor(cv2.imread(EXAMPLE, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(cv2.resize(rgb, (side, side), interpolation=cv2.INTER_AREA))


# -- uploads ------------------------------------------------------------------------------------------
def test_examples_are_small_rgb_images():
    names = sorted(f for f in os.listdir(app.EXAMPLES_DIR) if f.endswith('.png'))
    assert len(names) >= 3
    for name in names:
        lr, notes = app.check_upload(os.path.join(app.EXAMPLES_DIR, name))
        assert lr.dtype == np.uint8 and lr.shape[2] == 3 and 32 <= max(lr.shape[:2]) <= 64 and notes == []


def test_upload_not_an_image(tmp_path):
    path = tmp_path / 'notes.png'
    path.write_text('this is text, not a picture')
    with pytest.raises(app.UploadError, match=r'notes.png is not an image .* expected a PNG, JPEG'):
        app.check_upload(str(path))
    empty = tmp_path / 'empty.jpg'
    empty.write_bytes(b'')
    with pytest.raises(app.UploadError, match='not an image'):
        app.check_upload(str(empty))


def test_upload_too_large_names_the_limit(tmp_path):
    path = write_png(tmp_path / 'big.png', np.zeros((40, 70, 3), np.uint8))
    with pytest.raises(app.UploadError, match=r'big.png is 70x40 pixels, larger than the limit of 64 pixels per side'):
        app.check_upload(path, max_side=64)
    assert app.check_upload(path, max_side=70)[0].shape == (40, 70, 3)


def test_upload_file_size_limit(tmp_path, monkeypatch):
    path = write_png(tmp_path / 'noise.png', np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    monkeypatch.setattr(app, 'MAX_UPLOAD_MB', 0.001)
    with pytest.raises(app.UploadError, match=r'noise.png is .* MB; the limit is 0.001 MB per file'):
        app.check_upload(path)


@pytest.mark.parametrize('shape', [(1, 20), (20, 1), (7, 30)])
def test_upload_too_small(tmp_path, shape):
    path = write_png(tmp_path / 'thin.png', np.full(shape + (3, ), 128, np.uint8))
    with pytest.raises(app.UploadError, match=f'thin.png is {shape[1]}x{shape[0]} pixels; each side must be at least '
                       f'{app.MIN_SIDE} pixels'):
        app.check_upload(path)


def test_grayscale_is_converted_and_said(tmp_path):
    grey = np.arange(16 * 12, dtype=np.uint8).reshape(12, 16)
    lr, notes = app.check_upload(write_png(tmp_path / 'grey.png', grey))
    assert lr.shape == (12, 16, 3) and (lr == grey[..., None]).all()
    assert notes == ['grayscale image: converted to RGB (the grey channel copied to R, G and B)']


def test_alpha_transparent_refused_opaque_dropped(tmp_path):
    bgra = np.full((12, 12, 4), 200, np.uint8)
    bgra[..., 3] = 255
    lr, notes = app.check_upload(write_png(tmp_path / 'opaque.png', bgra))
    assert lr.shape == (12, 12, 3) and notes == ['alpha channel fully opaque: dropped']
    bgra[0, 0, 3] = 0
    with pytest.raises(app.UploadError, match='see-through.png has transparent pixels .* flatten it onto a background'):
        app.check_upload(write_png(tmp_path / 'see-through.png', bgra))


def test_no_upload():
    with pytest.raises(app.UploadError, match='no image: upload one or pick an example'):
        app.check_upload(None)


# -- models and one request ---------------------------------------------------------------------------
def test_shipped_models_are_offered_yoda_first():
    choices = app.model_choices()
    assert [os.path.basename(p) for _, p in choices] == ['demo_sr3_yoda_x4.pth', 'demo_sr3_x4.pth']
    assert all(os.path.exists(p) for _, p in choices)


def test_missing_checkpoint_names_the_command(tmp_path):
    models = app.Models([('gone', str(tmp_path / 'gone.pth'))], device='cpu')
    with pytest.raises(app.PageError, match=r'gone.pth does not exist. Make the demo models with '
                       r'`python scripts/benchmark_convergence.py .*--export yoda_plugin/weights`'):
        models.get('gone')


def test_options_from_the_checkpoint_record():
    path = app.model_choices()[0][1]
    opt = app.options_from_record(app.read_record(path))
    assert opt['model_type'] == 'SR3Model' and opt['scale'] == 4 and opt['yoda']['enabled'] is True
    assert [ds['attention_meta'] for ds in opt['datasets'].values()] == [{'source': {'name': 'edge'}}]


@pytest.fixture(scope='module')
def models():
    return app.Models(app.model_choices(), device='cpu')


@pytest.mark.parametrize('yoda_on', [True, False])
def test_run_gives_sr_masks_and_update_share(models, yoda_on):
    label = list(models.choices)[0]
    result = app.run(models, small_lr(16), label, 'ddpm', 3, 0, yoda_on, 'none')
    assert result['sr'].shape == result['bicubic'].shape == (64, 64, 3) and result['sr'].dtype == np.uint8
    frames = result['frames']
    assert [f['k'] for f in frames] == [3, 2, 1]
    assert all(app.frame_image(result['bicubic'], f).shape == (64, 64, 3) for f in frames)
    shares = [f['share'] for f in frames]
    # The update share is the mean refined share over the steps; the masks only grow as t falls.
    assert np.mean(shares) == pytest.approx(result['update_share'], abs=1e-6)
    assert shares == sorted(shares)
    if yoda_on:
        first = frames[0]
        mask = np.unpackbits(first['mask'], count=64 * 64).reshape(64, 64).astype(bool)
        assert mask.mean() == pytest.approx(first['share']) and 0 < first['share'] < 1
        assert result['attention'].shape == (64, 64, 3) and result['update_share'] < 1
    else:
        assert result['attention'] is None and shares == [1.0, 1.0, 1.0]
    again = app.run(models, small_lr(16), label, 'ddpm', 3, 0, yoda_on, 'none')
    assert (again['sr'] == result['sr']).all()  # the seed fixes the result


def test_run_refuses_bad_settings(models):
    label = list(models.choices)[0]
    with pytest.raises(app.PageError, match='steps must be 1 to'):
        app.run(models, small_lr(16), label, 'ddpm', 0, 0, True, 'none')
    with pytest.raises(app.PageError, match="unknown sampler 'euler'; expected one of ddpm, ddim, dpmpp_2m"):
        app.run(models, small_lr(16), label, 'euler', 3, 0, True, 'none')


def test_one_request_samples_at_a_time(models):
    pytest.importorskip('gradio', reason='the page needs Gradio: pip install -e .[app]')
    page = app.build_page(models)
    fns = page.fns.values() if isinstance(page.fns, dict) else page.fns
    run_fn = [f for f in fns if getattr(f.fn, '__name__', '') == 'on_run']
    assert len(run_fn) == 1 and run_fn[0].concurrency_limit == 1  # a second request waits in the queue


def test_help_exits_zero():
    out = subprocess.run([sys.executable, '-m', 'yoda_plugin', 'app', '--help'], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0 and '--host' in out.stdout and '127.0.0.1' in out.stdout


# -- the page in a browser ----------------------------------------------------------------------------
def browser_or_skip():
    chromium = shutil.which('chromium') or shutil.which('chromium-browser')
    driver = shutil.which('chromedriver')
    missing = [name for name, found in (('chromium', chromium), ('chromium-driver', driver)) if not found]
    try:
        import gradio  # noqa: F401
        import selenium  # noqa: F401
    except ImportError as e:
        missing.append(f'{e.name} (pip install -e .[test,app])')
    if missing:
        why = f'the browser test needs: {", ".join(missing)} (apt-get install chromium chromium-driver)'
        if os.environ.get('YODA_REQUIRE_BROWSER') == '1':
            pytest.fail(why)
        pytest.skip(why)
    return chromium, driver


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start_server(port: int, log, max_side: int = 64):
    env = {**os.environ, 'GRADIO_ANALYTICS_ENABLED': 'False', 'OMP_NUM_THREADS': '1'}
    proc = subprocess.Popen([sys.executable, '-m', 'yoda_plugin', 'app', '--port', str(port), '--threads', '1',
                             '--device', 'cpu', '--max-side', str(max_side)], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f'the server exited with {proc.returncode}')
        try:
            with urllib.request.urlopen(f'http://127.0.0.1:{port}/', timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError('the server did not answer within 180 s')


def chrome(chromium, driver_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ('--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                '--disable-background-networking', '--disable-component-update', '--disable-sync',
                '--disable-dev-shm-usage', '--window-size=1400,1800', f'--user-data-dir={tempfile.mkdtemp()}'):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver_path), options=options)


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f'timed out after {timeout} s waiting for {what}')


def upload(d, path):
    from selenium.webdriver.common.by import By
    clear = d.find_elements(By.CSS_SELECTOR, '#upload button[aria-label="Clear"]')
    if clear:
        clear[0].click()
        wait_for(lambda: d.find_elements(By.CSS_SELECTOR, '#upload input[type=file]'), 10, 'the upload field')
    d.find_element(By.CSS_SELECTOR, '#upload input[type=file]').send_keys(path)


def status(d) -> str:
    from selenium.webdriver.common.by import By
    return d.find_element(By.ID, 'status').text


@pytest.mark.slow
def test_page_in_a_browser(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    chromium, driver_path = browser_or_skip()
    lr_path = write_png(tmp_path / 'face.png', cv2.cvtColor(small_lr(16), cv2.COLOR_RGB2BGR))
    bad_path = tmp_path / 'notes.png'
    bad_path.write_text('this is text, not a picture')
    thin_path = write_png(tmp_path / 'thin.png', np.full((1, 20, 3), 128, np.uint8))
    big_path = write_png(tmp_path / 'big.png', np.full((70, 70, 3), 128, np.uint8))
    huge_path = tmp_path / 'huge.png'
    huge_path.write_bytes(np.random.default_rng(0).integers(0, 256, app.MAX_UPLOAD_MB * 2 ** 20 + 1024,
                                                            dtype=np.uint8).tobytes())
    port = free_port()
    log = open(tmp_path / 'server.log', 'w')
    server = start_server(port, log)
    d = None
    try:
        d = chrome(chromium, driver_path)
        d.get(f'http://127.0.0.1:{port}/')
        wait_for(lambda: d.find_elements(By.CSS_SELECTOR, '#upload input[type=file]'), 60, 'the page')
        steps = d.find_element(By.CSS_SELECTOR, '#steps input[type=number]')
        steps.clear()
        steps.send_keys('4', Keys.TAB)
        # A good image: 16x16 LR -> 64x64 SR, the masks of 4 steps.
        upload(d, lr_path)
        wait_for(lambda: 'Input: 16x16 pixels' in status(d), 30, 'the upload to be read')
        d.find_element(By.ID, 'run').click()
        wait_for(lambda: status(d).startswith('Done'), 240, f'the result (status: {status(d)!r})')
        assert 'ddpm 4 steps' in status(d) and 'update share' in status(d)
        sr = wait_for(lambda: [i for i in d.find_elements(By.CSS_SELECTOR, '#sr img') if d.execute_script(
            'return arguments[0].complete && arguments[0].naturalWidth', i)], 30, 'the SR image')[0]
        assert d.execute_script('return [arguments[0].naturalWidth, arguments[0].naturalHeight]', sr) == [64, 64]
        assert 'step 1 of 4' in d.find_element(By.ID, 'mask_caption').text
        # A bad file: a message on the page, for the upload and for a run.
        upload(d, str(bad_path))
        wait_for(lambda: 'Cannot use this upload' in status(d), 30, 'the message for a file that is no image')
        assert 'notes.png is not an image' in status(d) and 'expected a PNG' in status(d)
        d.find_element(By.ID, 'run').click()
        wait_for(lambda: 'notes.png is not an image' in status(d) and not d.find_elements(By.CSS_SELECTOR, '#sr img'),
                 30, 'the run to refuse the file')
        upload(d, thin_path)
        wait_for(lambda: 'thin.png is 20x1 pixels; each side must be at least' in status(d), 30,
                 'the message for a 1-pixel side')
        upload(d, big_path)
        wait_for(lambda: 'big.png is 70x70 pixels, larger than the limit of 64 pixels per side' in status(d), 30,
                 'the message for too many pixels')
        upload(d, str(huge_path))
        wait_for(lambda: 'exceed the maximum allowed size of 10' in d.find_element(By.TAG_NAME, 'body').text, 30,
                 'the message for a file over the size limit')
        # A bundled example, picked with its button.
        [b for b in d.find_elements(By.TAG_NAME, 'button') if b.text.strip() == 'coffee.png'][0].click()
        wait_for(lambda: 'Input: 48x48 pixels' in status(d), 30, 'the example to be read')
        # The server keeps serving.
        assert server.poll() is None
        upload(d, lr_path)
        d.find_element(By.ID, 'run').click()
        wait_for(lambda: status(d).startswith('Done'), 240, 'a second result')
    finally:
        if d is not None:
            d.quit()
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
