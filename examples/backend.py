#!/usr/bin/env python3
"""A backend for volley's proxies, standard library only. Run: python3 examples/backend.py 9000
then volley with proxy_connect_url = "http://127.0.0.1:9000/connect" (and /subscribe,
/publish, /rpc). A browser whose cookie holds session=<token of SESSIONS> connects as its user."""
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SESSIONS = {"s3cr3t-alice": "alice", "s3cr3t-bob": "bob"}  # your session store

def connect(r):  # who is this browser? its cookie says
    cookies = dict(c.strip().split("=", 1) for c in r["headers"].get("Cookie", "").split(";") if "=" in c)
    user = SESSIONS.get(cookies.get("session"))
    if user is None:
        return {"error": {"code": "unauthorized", "message": "log in first"}}
    return {"user": user, "info": {"name": user.title()}, "subscribe": ["chat.*"], "publish": []}

def subscribe(r):  # private.<user> is its owner's only
    ok = all(t == "private." + (r["user"] or "") for t in r["topics"])
    return {"result": "allow"} if ok else {"error": {"code": "forbidden", "message": "not yours"}}

def publish(r):  # chat messages are validated and stamped with their author
    text = r["data"].get("text", "") if isinstance(r["data"], dict) else ""
    if not r["topic"].startswith("chat.") or not 0 < len(text) <= 500:
        return {"error": {"code": "forbidden", "message": "chat text of 1-500 characters only"}}
    return {"result": "allow", "data": {"text": text, "from": r["user"]}}

def rpc(r):  # a command the application runs
    if r["method"] == "add":
        return {"data": sum(r["data"])}
    return {"error": {"code": "unknown_method", "message": r["method"]}}

ROUTES = {"/connect": connect, "/subscribe": subscribe, "/publish": publish, "/rpc": rpc}

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: volley reuses its connections

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        route = ROUTES.get(self.path)
        body = json.dumps(route(request) if route else {}).encode()
        self.send_response(200 if route else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
