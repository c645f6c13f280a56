"""The status-webhook receiver (`whatsapp-worker webhook`): Meta's callback, a wing of its own
beside the daemon's (the two never import each other), above the store.

Meta POSTs status updates (`sent`, `delivered`, `read`, `failed`) of the messages we sent, and
the customers' inbound messages, to `/webhook`. Each request is handled in this order:
1. its size: above WORKER_WEBHOOK_MAX_BODY it is refused (413) unread;
2. its signature (`X-Hub-Signature-256`, HMAC-SHA256 of the raw body with the app secret,
   compared in constant time): missing 401, wrong 403; nothing is parsed before this;
3. its shape: malformed JSON or unexpected shapes are logged with a reason and answered 200,
   so Meta does not retry garbage for a week (nothing in a body can crash the process);
4. its statuses and opt-outs go to the `StatusWriter`, which writes the statuses of all the
   requests waiting at that moment in one transaction (like the daemon's result writer), and
   the request is answered 200 only after that commit. A database outage answers 503, so
   Meta retries: an acknowledged status is never lost.
The `Settler` then applies stored statuses to their rows (store/statuses.py), at once after
each write, and in a full sweep every few seconds for statuses that arrived before the
daemon's own result.
"""
