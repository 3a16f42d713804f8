// volley.js: the browser client for volley. An ES module with no dependencies.
//
//   import { connect } from "/volley.js";
//   const client = connect("https://broker.example.com", { token });
//   const sub = client.subscribe(["chat.room1"], {}, (event) => render(event));
//   await client.publish("chat.room1", { text: "hi" });
//
// What it keeps for you: one WebSocket, reconnected with exponential backoff and jitter
// (starting from the broker's reconnect_delay_ms); every subscription resumed after a
// reconnect from the last event it received (`since`), so the application sees every
// retained event exactly once and in order; `recovered: false` reported to the
// subscription's onRecoveryFailed (the application should reload its state); a fallback
// to Server-Sent Events for receiving and POST /publish for sending when WebSockets fail;
// a token hook for expiring JWTs, asked before every connection; and rpc to the
// application's backend. Without a token the broker's connect proxy may still let the
// page in (a cookie session).

const MAX_DELAY_MS = 30000;
// WebSocket attempts that never opened before "auto" falls back to SSE.
const FALLBACK_AFTER = 2;

/** Whether `topic` matches `pattern` (`*`: one segment, final `>`: one or more). */
export function matches(pattern, topic) {
  const p = pattern.split(".");
  const t = topic.split(".");
  for (let i = 0; i < p.length; i++) {
    if (p[i] === ">") return i === p.length - 1 && t.length > i;
    if (i >= t.length || (p[i] !== "*" && p[i] !== t[i])) return false;
  }
  return p.length === t.length;
}

/** Opens a client to the broker at `url` (http(s)://host:port). */
export function connect(url, options = {}) {
  return new Client(url, options);
}

class Client {
  constructor(url, options) {
    this.url = url.replace(/\/$/, "");
    this.options = options;
    this.transport = options.transport || "auto"; // "auto" | "websocket" | "sse"
    this.listeners = { connecting: [], connected: [], disconnected: [] };
    this.subs = new Map(); // id -> subscription
    this.pending = new Map(); // message_id -> {resolve, reject}
    this.nextId = 1;
    this.attempt = 0;
    this.opened = false; // a WebSocket ever opened
    this.baseDelay = options.reconnectDelayMs || 1000;
    this.closed = false;
    this.ws = null;
    this.sources = new Map(); // SSE fallback: subscription id -> EventSource
    this.state = "disconnected";
    queueMicrotask(() => this.open());
  }

  /** `cb` is called with no argument when the client enters `state`. */
  on(state, cb) {
    this.listeners[state].push(cb);
    return this;
  }

  setState(state, detail) {
    this.state = state;
    for (const cb of this.listeners[state]) cb(detail);
  }

  async token() {
    return this.options.getToken ? await this.options.getToken() : this.options.token;
  }

  async open() {
    if (this.closed) return;
    this.setState("connecting");
    const token = await this.token();
    if (this.transport === "sse" || (this.transport === "auto" && !this.opened && this.attempt >= FALLBACK_AFTER)) {
      this.usingSse = true;
      for (const sub of this.subs.values()) this.openSource(sub, token);
      this.setState("connected", { transport: "sse" });
      return;
    }
    const base = this.options.websocketUrl || this.url.replace(/^http/, "ws") + "/ws";
    const ws = new WebSocket(token ? `${base}?token=${encodeURIComponent(token)}` : base);
    this.ws = ws;
    ws.onmessage = (e) => this.onMessage(JSON.parse(e.data));
    ws.onclose = (e) => {
      if (this.ws !== ws) return;
      this.ws = null;
      for (const { reject } of this.pending.values()) reject(new Error("disconnected"));
      this.pending.clear();
      // 4000-4999 but 4001 come from the server API (an operator or the application
      // disconnected this client): reconnecting is the application's decision.
      const final = e.code >= 4000 && e.code <= 4999 && e.code !== 4001;
      if (final) this.closed = true;
      this.setState("disconnected", { code: e.code, reason: e.reason, final });
      this.retry();
    };
  }

  retry() {
    if (this.closed) return;
    const delay = Math.min(MAX_DELAY_MS, this.baseDelay * 2 ** this.attempt);
    this.attempt++;
    // Full jitter over the upper half: clients dropped together do not return together.
    setTimeout(() => this.open(), delay / 2 + (Math.random() * delay) / 2);
  }

  onMessage(m) {
    if (m.type === "ack" && m.payload && m.payload.status === "connected") {
      this.opened = true;
      this.attempt = 0;
      this.baseDelay = m.payload.reconnect_delay_ms || this.baseDelay;
      for (const sub of this.subs.values()) this.sendSubscribe(sub);
      this.setState("connected", { transport: "websocket", clientId: m.payload.client_id });
      return;
    }
    if (m.type === "event") {
      for (const sub of this.subs.values()) sub.deliver(m);
      return;
    }
    if (m.type === "unsubscribed") {
      // The server took this topic out of our subscriptions: do not ask for it again.
      const topic = m.payload.topic;
      for (const sub of [...this.subs.values()]) {
        if (!sub.patterns.includes(topic)) continue;
        sub.patterns = sub.patterns.filter((p) => p !== topic);
        if (sub.patterns.length === 0) this.subs.delete(sub.id);
        if (sub.options.onUnsubscribed) sub.options.onUnsubscribed(topic);
      }
      return;
    }
    if (m.type === "presence") {
      for (const sub of this.subs.values()) if (sub.options.onPresence) sub.options.onPresence(m.payload);
      return;
    }
    const waiting = m.correlation_id && this.pending.get(m.correlation_id);
    if (!waiting) return;
    this.pending.delete(m.correlation_id);
    if (m.type === "error") waiting.reject(Object.assign(new Error(m.payload.message), { code: m.payload.code }));
    else waiting.resolve(m.payload);
  }

  send(type, payload) {
    const id = `c${this.nextId++}`;
    return new Promise((resolve, reject) => {
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return reject(new Error("not connected"));
      this.pending.set(id, { resolve, reject });
      this.ws.send(JSON.stringify({ type, message_id: id, payload }));
    });
  }

  sendSubscribe(sub) {
    const payload = { subscription_id: sub.id, topics: sub.patterns, ...sub.filters() };
    if (sub.lastId) payload.since = sub.lastId;
    this.send("subscribe", payload).then(
      (ack) => {
        if (ack.recovered === false) sub.recoveryFailed();
      },
      (error) => sub.options.onError && sub.options.onError(error),
    );
  }

  openSource(sub, token) {
    const query = new URLSearchParams({ topics: sub.patterns.join(",") });
    if (sub.options.sources) query.set("sources", sub.options.sources.join(","));
    if (sub.options.correlation_id) query.set("correlation_id", sub.options.correlation_id);
    if (sub.lastId) query.set("since", sub.lastId);
    if (token) query.set("token", token);
    const source = new EventSource(`${this.url}/sse?${query}`);
    // EventSource reconnects by itself and sends Last-Event-ID: resumes need nothing more.
    source.onmessage = (e) => sub.deliver(JSON.parse(e.data));
    source.addEventListener("recovery_failed", () => sub.recoveryFailed());
    // The server API disconnected this client: stop, as over WebSocket (a final close).
    source.addEventListener("disconnect", (e) => {
      const { code, reason } = JSON.parse(e.data);
      this.closed = true;
      for (const other of this.sources.values()) other.close();
      this.setState("disconnected", { code, reason, final: true });
    });
    this.sources.set(sub.id, source);
  }

  /**
   * Subscribes to `patterns`; `onEvent(event)` gets each matching event once, in order.
   * `options`: `sources`, `correlation_id`, `presence` (join/leave to `onPresence`),
   * `onRecoveryFailed()` (events were missed: reload state), `onError(error)`,
   * `onUnsubscribed(topic)` (the server API took `topic` out of it).
   */
  subscribe(patterns, options, onEvent) {
    const sub = new Subscription(this, `s${this.nextId++}`, patterns, options || {}, onEvent);
    this.subs.set(sub.id, sub);
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.sendSubscribe(sub);
    if (this.usingSse) this.token().then((token) => this.openSource(sub, token));
    return sub;
  }

  /** Publishes one event; resolves with its id once the broker has accepted it. */
  async publish(topic, data, options = {}) {
    const event = { topic, data, ...options };
    if (!this.usingSse) return (await this.request("publish", event)).message_id;
    const token = await this.token();
    const response = await fetch(`${this.url}/publish`, {
      method: "POST",
      headers: { "Content-Type": "application/json", ...(token ? { Authorization: `Bearer ${token}` } : {}) },
      body: JSON.stringify(event),
    });
    const body = await response.json();
    if (!response.ok) throw Object.assign(new Error(body.error.message), { code: body.error.code });
    return body.message_ids[0];
  }

  /** A `request` action (`history`, `presence`, `stats`...); resolves with its payload. */
  request(action, payload = {}) {
    return this.send("request", { action, ...payload });
  }

  /**
   * Calls the application's backend (the broker's `proxy_rpc_url`) with `method` and
   * `data`; resolves with the backend's `data`, rejects with its `code` and `message`.
   */
  async rpc(method, data = null) {
    return (await this.request("rpc", { method, data })).data;
  }

  /** Closes for good. */
  close() {
    this.closed = true;
    if (this.ws) this.ws.close();
    for (const source of this.sources.values()) source.close();
  }
}

class Subscription {
  constructor(client, id, patterns, options, onEvent) {
    Object.assign(this, { client, id, patterns, options, onEvent, lastId: null });
  }

  filters() {
    const out = {};
    if (this.options.sources) out.sources = this.options.sources;
    if (this.options.correlation_id) out.correlation_id = this.options.correlation_id;
    if (this.options.presence) out.presence = true;
    return out;
  }

  wants(event) {
    const p = event.payload;
    return (
      this.patterns.some((pattern) => matches(pattern, p.topic)) &&
      (!this.options.sources || this.options.sources.includes(p.source)) &&
      (!this.options.correlation_id || this.options.correlation_id === event.correlation_id)
    );
  }

  deliver(event) {
    if (!this.wants(event)) return;
    this.lastId = event.message_id;
    this.onEvent(event);
  }

  recoveryFailed() {
    if (this.options.onRecoveryFailed) this.options.onRecoveryFailed();
  }

  /** Stops the subscription. */
  unsubscribe() {
    const client = this.client;
    client.subs.delete(this.id);
    const source = client.sources.get(this.id);
    if (source) {
      source.close();
      client.sources.delete(this.id);
    }
    if (client.ws && client.ws.readyState === WebSocket.OPEN) {
      client.send("unsubscribe", { subscription_id: this.id }).catch(() => {});
    }
  }
}
