#!/usr/bin/env python3
"""The backend the tests call volley's proxies against (tests/backends.rs).

Each answer is chosen by the request so one process serves every case:
  /connect    cookie session=<user> allows (session=expired:<s> expires in s seconds),
              session=deny refuses, no cookie refuses as unauthorized
  /subscribe  topics under allowed.* allow, under slow.* allow after 0.5 s, else refuse
  /publish    chat.* needs {"text": ...} and is replaced by {"text", "checked": true};
              deny.* refuses; anything else allows unchanged
  /rpc        method echo, slow (data.ms, default 500), fail (HTTP 500), deny (refusal),
              hang (10 s), garbage (not JSON)
  /webhook    records each post (body and X-Volley-Signature); /webhook-flaky answers
              500 to its first two posts
  GET /calls  how many calls each path got, and the largest number at once
  GET /webhooks  the posts /webhook and /webhook-flaky took
Usage: backend.py PORT
"""
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

calls = {}
hooks = []
lock = threading.Lock()
running = {"now": 0, "max": 0}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self):
        with lock:
            if self.path == "/webhooks":
                self.answer(200, {"posts": hooks})
            else:
                self.answer(200, {"calls": calls, "max_at_once": running["max"]})

    def do_POST(self):
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path.startswith("/webhook"):
            with lock:
                calls[self.path] = calls.get(self.path, 0) + 1
                if self.path == "/webhook-flaky" and calls[self.path] <= 2:
                    return self.answer(500, {"flaky": True})
                hooks.append({"signature": self.headers.get("X-Volley-Signature"), "body": raw.decode()})
            return self.answer(200, {})
        request = json.loads(raw)
        with lock:
            calls[self.path] = calls.get(self.path, 0) + 1
            running["now"] += 1
            running["max"] = max(running["max"], running["now"])
        try:
            status, body = getattr(self, self.path.strip("/"))(request)
        finally:
            with lock:
                running["now"] -= 1
        self.answer(status, body)

    def connect(self, request):
        cookie = request["headers"].get("Cookie", "")
        session = dict(p.strip().split("=", 1) for p in cookie.split(";") if "=" in p).get("session")
        if session is None:
            return 200, {"error": {"code": "unauthorized", "message": "no session"}}
        if session == "deny":
            return 200, {"error": {"code": "forbidden", "message": "banned"}}
        expire_at = None
        if session.startswith("expired:"):
            expire_at = int(time.time()) + int(session.split(":")[1])
            session = "expiring"
        return 200, {"user": session, "info": {"name": session.title()}, "subscribe": ["chat.>", "room.*"],
                     "publish": ["chat.>"], "expire_at": expire_at}

    def subscribe(self, request):
        topics = request["topics"]
        if all(t.startswith("slow.") for t in topics):
            time.sleep(0.5)
            return 200, {"result": "allow"}
        if all(t.startswith("allowed.") for t in topics):
            return 200, {"result": "allow"}
        return 200, {"error": {"code": "forbidden", "message": "not yours: " + ",".join(topics)}}

    def publish(self, request):
        topic, data = request["topic"], request["data"]
        if topic.startswith("deny."):
            return 200, {"error": {"code": "forbidden", "message": "moderated"}}
        if topic.startswith("chat."):
            if not isinstance(data, dict) or "text" not in data:
                return 200, {"error": {"code": "bad_message", "message": "text is required"}}
            return 200, {"result": "allow", "data": {"text": data["text"], "checked": True}}
        return 200, {"result": "allow"}

    def rpc(self, request):
        method, data = request["method"], request["data"]
        if method == "echo":
            return 200, {"data": {"echo": data, "user": request["user"]}}
        if method == "slow":
            time.sleep((data or {}).get("ms", 500) / 1000)
            return 200, {"data": data}
        if method == "fail":
            return 500, {"oops": True}
        if method == "deny":
            return 200, {"error": {"code": "not_allowed", "message": "no " + method}}
        if method == "hang":
            time.sleep(10)
            return 200, {"data": None}
        if method == "garbage":
            return 200, b"not json"
        return 200, {"error": {"code": "unknown_method", "message": method}}


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 4096


if __name__ == "__main__":
    Server(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
