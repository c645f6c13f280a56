"""The sending process (`whatsapp-worker run`): a wing of its own beside the webhook receiver's,
above the store and the ground floor; the two wings never import each other.

- `serve`: the composition root: the sender, metrics endpoint, signals and log sink around the loop;
- `parts`: the daemon's parts, built and wired in one place; `control`: what the parts tell the
  loop (stop, pause under cron, 130429, a database outage); `status`: what the daemon says of
  itself (its daemons row, the heartbeat line); `sweep`: the periodic recovery sweep;
- `loop`: claim as many rows as there are free slots and tokens, send, drain;
- `processor`: one row's path (validate, send, decide, record); `policy`: Meta's answers as pure
  decisions; `retry`: the backoff; `sender`: the Cloud API client;
- `recorder`, `progress`: results written in fenced batches, progress lines;
- `numbers`, `ratelimit`, `pause`: per sending number: its share of the rate, its pause and probe;
- `fleet`: this daemon's row in the daemons table and its share of the limit;
- `rotation`: which sessions the next claim serves (fair share, quiet hours);
- `heartbeat`: the file `health` reads, and the systemd watchdog.
"""
