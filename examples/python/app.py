"""A Python app that hands a slow HTTP call to `patient serve` and gets the
outcome back by webhook, verified with the reference `standardwebhooks`
package.

    pip install standardwebhooks
    PATIENT_WEBHOOK_SECRET=whsec_... patient serve            # the daemon signs with this secret
    PATIENT_WEBHOOK_SECRET=whsec_... python3 app.py URL       # URL: what to call, e.g. a test upstream

It starts a webhook receiver on a free loopback port, submits one task whose
outcome goes to that receiver, waits for the delivery, verifies its signature
and prints the outcome event. The daemon's egress guard must allow the
receiver's address (`PATIENT_EGRESS__ALLOW=127.0.0.1` for this local run).
Only the standard library and `standardwebhooks` are used.
"""

import http.server
import json
import os
import queue
import sys
import threading
import urllib.request

from standardwebhooks.webhooks import Webhook

DAEMON = os.environ.get("PATIENT_URL", "http://127.0.0.1:8750")
TOKEN = os.environ.get("PATIENT_API_TOKEN")
SECRET = os.environ["PATIENT_WEBHOOK_SECRET"]

received: "queue.Queue[dict]" = queue.Queue()


class Receiver(http.server.BaseHTTPRequestHandler):
    """Verifies each delivery before trusting it; answers 2xx only then."""

    def do_POST(self):  # noqa: N802 (the http.server naming)
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            event = Webhook(SECRET).verify(body, headers)
        except Exception as error:  # a bad signature, or a stale timestamp
            self.send_response(400)
            self.end_headers()
            self.wfile.write(f"rejected: {error}".encode())
            return
        self.send_response(204)
        self.end_headers()
        # The webhook-id is the same on every redelivery: a real app stores
        # it and ignores duplicates.
        received.put({"id": headers["webhook-id"], "event": event})

    def log_message(self, *args):
        pass


def submit(url: str, hook: str) -> dict:
    body = {
        "request": {"http_method": "get", "url": url, "headers": {}, "body": None,
                    "timeout": 30, "max_redirects": None},
        "callback": "ExampleCallback",
        "callback_args": {"from": "python"},
        "deliver": {"webhook": {"url": hook}},
    }
    request = urllib.request.Request(
        f"{DAEMON}/v1/tasks", data=json.dumps(body).encode(), method="POST",
        headers={"content-type": "application/json",
                 **({"authorization": f"Bearer {TOKEN}"} if TOKEN else {})})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.load(answer)


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{server.server_address[1]}/hooks/patient"
    task = submit(sys.argv[1], hook)
    print(f"submitted {task['id']} ({task['state']})", file=sys.stderr)
    try:
        delivery = received.get(timeout=60)
    except queue.Empty:
        print("no verified delivery within 60 s", file=sys.stderr)
        return 1
    finally:
        server.shutdown()
    event = delivery["event"]["data"]
    print(json.dumps({"webhook_id": delivery["id"], "type": event["type"],
                      "task_id": event["task_id"],
                      "status": (event["response"] or {}).get("status"),
                      "error": event["error"]}))
    return 0 if event["task_id"] == task["id"] else 1


if __name__ == "__main__":
    sys.exit(main())
