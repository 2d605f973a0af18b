"""Drives the web chat page of a running `hypertensor api` in headless Chromium.

Usage: python3 browser_chat.py http://127.0.0.1:PORT

Launches Chromium (HYPERTENSOR_CHROMIUM, else `chromium` on PATH) with a
throwaway profile and talks to it over the Chrome DevTools Protocol with the
`websocket-client` package: opens `/`, types a question into #input with real
input events, clicks #send, waits for the page to go streaming -> idle, and
checks that the assistant's answer is non-empty and grew in more than one
step. Prints one JSON line, exits non-zero on any failure.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.request

import websocket

QUESTION = "What is the capital of France?"
TIMEOUT_S = 180


class Page:
    """A CDP session on one page target."""

    def __init__(self, ws_url: str) -> None:
        # Chromium refuses DevTools websockets whose Origin it does not trust.
        self.ws = websocket.create_connection(
            ws_url, timeout=TIMEOUT_S + 60, suppress_origin=True
        )
        self.next_id = 0
        self.events = []

    def call(self, method: str, **params):
        self.next_id += 1
        ident = self.next_id
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == ident:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_event(self, method: str):
        seen = [e for e in self.events if e.get("method") == method]
        if seen:
            self.events.remove(seen[0])
            return seen[0]
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("method") == method:
                return msg
            self.events.append(msg)

    def eval(self, expression: str):
        """Evaluates JS (awaiting promises) and returns its value."""
        r = self.call(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in r:
            raise RuntimeError(f"JS failed: {r['exceptionDetails']}\n{expression}")
        return r["result"].get("value")


def launch(profile: str):
    exe = os.environ.get("HYPERTENSOR_CHROMIUM") or shutil.which("chromium") or shutil.which(
        "chromium-browser"
    )
    if not exe:
        sys.exit("chromium not found (set HYPERTENSOR_CHROMIUM)")
    args = [
        exe,
        "--headless=new",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-gpu",
        "--disable-extensions",
        "--disable-dev-shm-usage",
        "about:blank",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.insert(1, "--no-sandbox")  # Chromium refuses to run as root otherwise
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # Chromium announces its DevTools endpoint on stderr once it listens.
    log = []
    for line in proc.stderr:
        log.append(line)
        m = re.search(r"DevTools listening on (ws://\S+)", line)
        if m:
            # Keep draining so a chatty browser never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            port = re.search(r":(\d+)/", m.group(1)).group(1)
            return proc, port
    proc.wait()
    sys.exit("chromium exited before opening DevTools:\n" + "".join(log[-30:]))


def main() -> None:
    url = sys.argv[1].rstrip("/") + "/"
    profile = tempfile.mkdtemp(prefix="hypertensor-chromium-")
    proc = None
    try:
        proc, port = launch(profile)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as r:
            targets = json.load(r)
        target = next(t for t in targets if t.get("type") == "page")
        page = Page(target["webSocketDebuggerUrl"])
        page.call("Page.enable")
        page.call("Runtime.enable")
        page.call("Page.navigate", url=url)
        page.wait_event("Page.loadEventFired")

        # Wait (in the page) until the model picker is filled from /v1/models.
        page.eval(
            """new Promise((resolve, reject) => {
                 const t0 = Date.now();
                 (function check() {
                   if (document.getElementById('model').options.length) resolve(true);
                   else if (Date.now() - t0 > 30000) reject(new Error('no models'));
                   else setTimeout(check, 20);
                 })();
               })"""
        )
        # Record every state change and every length the answer takes.
        page.eval(
            """(() => {
                 window.__states = [document.body.dataset.state];
                 window.__lengths = [];
                 new MutationObserver(() => window.__states.push(document.body.dataset.state))
                   .observe(document.body, {attributes: true, attributeFilter: ['data-state']});
                 new MutationObserver(() => {
                   const a = document.querySelectorAll('.assistant');
                   if (!a.length) return;
                   const n = a[a.length - 1].textContent.length;
                   if (window.__lengths[window.__lengths.length - 1] !== n) window.__lengths.push(n);
                 }).observe(document.getElementById('messages'),
                            {subtree: true, childList: true, characterData: true});
                 document.getElementById('temperature').value = '0';
                 document.getElementById('input').focus();
                 return true;
               })()"""
        )
        page.call("Input.insertText", text=QUESTION)
        box = page.eval(
            """(() => { const r = document.getElementById('send').getBoundingClientRect();
                        return {x: r.x + r.width / 2, y: r.y + r.height / 2}; })()"""
        )
        for kind in ("mousePressed", "mouseReleased"):
            page.call(
                "Input.dispatchMouseEvent",
                type=kind,
                x=box["x"],
                y=box["y"],
                button="left",
                clickCount=1,
            )
        result = page.eval(
            """new Promise((resolve, reject) => {
                 const t0 = Date.now();
                 (function check() {
                   const s = window.__states;
                   if (s.includes('streaming') && document.body.dataset.state === 'idle') {
                     const a = document.querySelectorAll('.assistant');
                     resolve({
                       states: s,
                       lengths: window.__lengths,
                       answer: a.length ? a[a.length - 1].textContent : '',
                       user: [...document.querySelectorAll('.user')].map(e => e.textContent),
                       errors: [...document.querySelectorAll('.error')].map(e => e.textContent),
                     });
                   } else if (Date.now() - t0 > %d) {
                     reject(new Error('timed out; states ' + JSON.stringify(s)));
                   } else setTimeout(check, 20);
                 })();
               })"""
            % (TIMEOUT_S * 1000)
        )
        assert not result["errors"], result
        assert result["user"] == [QUESTION], result
        assert result["answer"].strip(), f"empty answer: {result}"
        grew = [n for n in result["lengths"] if n > 0]
        assert len(grew) > 1, f"the answer appeared in one step: {result}"
        assert grew == sorted(grew), f"the answer shrank: {result}"
        assert result["states"][0] == "idle" and "streaming" in result["states"], result
        print(json.dumps({"answer": result["answer"], "steps": len(grew)}))
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
