#!/usr/bin/env python3
"""A chat backend for volley's proxies (standard library only): python3 examples/backend.py 9000,
then volley with proxy_{connect,subscribe,publish,rpc}_url = "http://127.0.0.1:9000/<name>"."""
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SESSIONS = {"s3cr3t-alice": "alice", "s3cr3t-bob": "bob"}  # your session store
refuse = lambda code, message: {"error": {"code": code, "message": message}}

def connect(r):  # who is this browser? its session cookie says
    cookies = dict(c.strip().split("=", 1) for c in r["headers"].get("Cookie", "").split(";") if "=" in c)
    user = SESSIONS.get(cookies.get("session"))
    return {"user": user, "info": {"name": user.title()}, "subscribe": ["chat.*"]} if user else refuse("unauthorized", "log in first")

def subscribe(r):  # private.<user> is its owner's alone
    return {"result": "allow"} if all(t == f"private.{r['user']}" for t in r["topics"]) else refuse("forbidden", "not yours")

def publish(r):  # chat messages are checked and stamped with their author
    text = r["data"].get("text", "") if isinstance(r["data"], dict) else ""
    if not r["topic"].startswith("chat.") or not 0 < len(text) <= 500:
        return refuse("forbidden", "chat text of 1-500 characters only")
    return {"result": "allow", "data": {"text": text, "from": r["user"]}}

def rpc(r):  # commands the application runs
    return {"data": sum(r["data"])} if r["method"] == "add" else refuse("unknown_method", r["method"])

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: volley reuses its connections to the backend

    def do_POST(self):
        route = {"/connect": connect, "/subscribe": subscribe, "/publish": publish, "/rpc": rpc}.get(self.path)
        body = json.dumps(route(json.loads(self.rfile.read(int(self.headers["Content-Length"])))) if route else {}).encode()
        self.send_response(200 if route else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
