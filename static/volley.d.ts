// Types for volley.js (the browser client served by volley at /volley.js).

export interface VolleyEvent<T = unknown> {
  type: "event";
  message_id: string;
  timestamp: string;
  correlation_id: string | null;
  payload: { topic: string; source: string; data: T };
}

export interface PresenceEntry {
  client_id: string;
  node: string;
  user: string | null;
  info: unknown;
  transport: "websocket" | "sse";
  since: string;
}

export interface PresenceNotice {
  action: "join" | "leave";
  topic: string;
  entry: PresenceEntry;
}

export interface ConnectOptions {
  /** A JWT, sent as ?token= (WebSocket, SSE) or Authorization: Bearer (publish). */
  token?: string;
  /** Asked before every connection: return a fresh token for expiring JWTs. */
  getToken?: () => string | Promise<string>;
  /** "auto" (default: WebSocket, SSE + POST /publish after two failed attempts). */
  transport?: "auto" | "websocket" | "sse";
  /** First reconnect delay until the broker tells its own (reconnect_delay_ms). */
  reconnectDelayMs?: number;
  /** Where the WebSocket goes, if not <url>/ws with a ws(s) scheme. */
  websocketUrl?: string;
}

export interface SubscribeOptions {
  sources?: string[];
  correlation_id?: string;
  /** Receive join/leave of the exact topics subscribed to, in onPresence. */
  presence?: boolean;
  onPresence?: (notice: PresenceNotice) => void;
  /** The broker could not resume: events were missed; reload the application's state. */
  onRecoveryFailed?: () => void;
  onError?: (error: Error & { code?: string }) => void;
  /** The server API took `topic` out of this subscription (it is not asked for again). */
  onUnsubscribed?: (topic: string) => void;
}

export interface Subscription {
  readonly id: string;
  /** The id of the last event delivered (where a reconnect resumes). */
  readonly lastId: string | null;
  unsubscribe(): void;
}

export interface Client {
  readonly state: "connecting" | "connected" | "disconnected";
  /**
   * `connected` gets `{transport, clientId}`; `disconnected` gets the close `{code, reason,
   * final}`; `final` (a server API disconnect, 4000-4999 but 4001) means no reconnect.
   */
  on(
    state: "connecting" | "connected" | "disconnected",
    cb: (detail?: { transport?: string; clientId?: string; code?: number; reason?: string; final?: boolean }) => void,
  ): Client;
  subscribe<T = unknown>(patterns: string[], options: SubscribeOptions, onEvent: (event: VolleyEvent<T>) => void): Subscription;
  /** Resolves with the event's id once the broker accepted it. */
  publish(topic: string, data: unknown, options?: { source?: string; correlation_id?: string }): Promise<string>;
  /** A request action (history, presence, presence_stats, stats, list_subscriptions...). */
  request(action: string, payload?: Record<string, unknown>): Promise<unknown>;
  /** Calls the application's backend (proxy_rpc_url); resolves with its data. */
  rpc<T = unknown>(method: string, data?: unknown): Promise<T>;
  close(): void;
}

export function connect(url: string, options?: ConnectOptions): Client;
export function matches(pattern: string, topic: string): boolean;
