#!/usr/bin/env python
"""docs/figures/app.png: the page (``python -m yoda_plugin app``) after one run, shot in headless Chromium.

    python scripts/app_screenshot.py [--out docs/figures/app.png] [--example astronaut.png] [--step 8]

Needs ``pip install -e .[test,app]`` and Debian's ``chromium`` and ``chromium-driver``. Starts the page on a free
loopback port, picks the bundled example, samples with the page's defaults (the shipped YODA demo model), moves
the mask slider to ``--step`` and saves the whole page. Rerun it when the shipped models change.
"""
import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'tests'))

import test_app as helpers  # noqa: E402  (the browser test's server and Chromium helpers)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', default=os.path.join(REPO, 'docs', 'figures', 'app.png'))
    p.add_argument('--example', default='astronaut.png')
    p.add_argument('--step', type=int, default=8, help='the sampling step whose mask M(t) is shown')
    args = p.parse_args(argv)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    chromium, driver_path = helpers.browser_or_skip()
    port = helpers.free_port()
    with open(os.devnull, 'w') as log:
        server = helpers.start_server(port, log, max_side=128)
        d = helpers.chrome(chromium, driver_path)
        try:
            d.get(f'http://127.0.0.1:{port}/')
            helpers.wait_for(lambda: d.find_elements(By.CSS_SELECTOR, '#upload input[type=file]'), 60, 'the page')
            helpers.upload(d, os.path.join(helpers.app.EXAMPLES_DIR, args.example))
            helpers.wait_for(lambda: 'Input:' in helpers.status(d), 30, 'the upload')
            d.find_element(By.ID, 'run').click()
            helpers.wait_for(lambda: helpers.status(d).startswith('Done'), 600, 'the result')
            slider = d.find_element(By.CSS_SELECTOR, '#mask_slider input[type=number]')
            slider.clear()
            slider.send_keys(str(args.step), Keys.TAB)
            time.sleep(3)
            d.set_window_size(1400, min(d.execute_script('return document.body.scrollHeight') + 40, 2400))
            time.sleep(2)
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            d.save_screenshot(args.out)
            print(f'wrote {args.out}: {helpers.status(d)}')
        finally:
            d.quit()
            server.terminate()
            server.wait()
    return 0


if __name__ == '__main__':
    sys.exit(main())
