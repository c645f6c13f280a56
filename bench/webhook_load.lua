-- wrk script for bench/webhook_load.py: replays pre-signed webhook bodies at a fixed offered
-- rate (open loop, as far as wrk allows), one distinct body per request.
--
--   wrk -t1 -cC -dD --timeout 10s -s bench/webhook_load.lua URL -- \
--       bodies=FILE limit=LINES rate=REQUESTS_PER_S threads=N   (WEBHOOK_LOAD_OUT=FILE in the environment)
--
-- FILE holds one request a line: `<X-Hub-Signature-256 value>\t<JSON body>`. Each wrk thread
-- takes every Nth line. The schedule is per thread: request k is due at t0 + k / (rate / N);
-- a connection that is free claims the next due time and waits for it (`delay`). A due time
-- claimed after it has passed means every connection was busy (the server holds them all):
-- that lag is counted, since wrk times a request only from when it is written.
-- After the last body a connection waits for the end of the run (-d). `done` writes a JSON
-- summary to $WEBHOOK_LOAD_OUT (latencies in microseconds, from wrk's own histogram).

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now()
   ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
   return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

-- main state ---------------------------------------------------------------------------------

local threads = {}

local function option(args, key)
   for i = 0, #args do
      local a = args[i]
      if a ~= nil then
         local k, v = string.match(a, "^([%w_]+)=(.*)$")
         if k == key then return v end
      end
   end
   return nil
end

function setup(thread)
   thread:set("tid", #threads)
   table.insert(threads, thread)
end

-- thread state -------------------------------------------------------------------------------

local requests = {}
local count = 0
local interval = 0
local t0 = nil
local claimed = 0
local written = 0
-- exported with thread:get (plain globals)
stats = nil

function init(args)
   local nthreads = tonumber(option(args, "threads") or "1")
   local rate = tonumber(option(args, "rate"))
   local path = option(args, "bodies")
   local limit = tonumber(option(args, "limit") or "1e18")
   local line_no = 0
   for line in io.lines(path) do
      if line_no >= limit then break end
      if line_no % nthreads == tid then
         local tab = string.find(line, "\t", 1, true)
         local signature, body = string.sub(line, 1, tab - 1), string.sub(line, tab + 1)
         count = count + 1
         requests[count] = wrk.format("POST", "/webhook", {
            ["Content-Type"] = "application/json",
            ["X-Hub-Signature-256"] = signature,
         }, body)
      end
      line_no = line_no + 1
   end
   interval = nthreads / rate
   stats = {
      count = count, claimed = 0, written = 0, extra = 0, ok = 0, other = 0, -- code_<status> = n
      late = 0, late_10ms = 0, max_late = 0, t0 = 0, last_due = 0, last_answer = 0,
   }
end

function delay()
   local t = now()
   if t0 == nil then t0 = t; stats.t0 = t end
   if claimed >= count then
      return 3600000 -- every body is out: wait for the end of the run
   end
   local due = t0 + claimed * interval
   claimed = claimed + 1
   stats.claimed = claimed
   stats.last_due = due
   local wait = due - t
   if wait < 0 then
      local lag = -wait
      if lag > 0.001 then stats.late = stats.late + 1 end
      if lag > 0.010 then stats.late_10ms = stats.late_10ms + 1 end
      if lag > stats.max_late then stats.max_late = lag end
      return 0
   end
   return math.floor(wait * 1000 + 0.5)
end

function request()
   if t0 == nil then -- wrk checks that thread 1's request parses before the run: not sent
      return requests[1]
   end
   written = written + 1
   stats.written = written
   if written > count then -- a reconnect that skipped `delay`: send the last body again
      stats.extra = stats.extra + 1
      return requests[count]
   end
   return requests[written]
end

function response(status, headers, body)
   if status == 200 then
      stats.ok = stats.ok + 1
   else
      stats.other = stats.other + 1
      local key = "code_" .. tostring(status) -- flat: thread:get crashes on nested tables
      stats[key] = (stats[key] or 0) + 1
   end
   stats.last_answer = now()
end

-- main state again ---------------------------------------------------------------------------

function done(summary, latency, requests_)
   local parts = {}
   local function add(k, v) table.insert(parts, string.format("%q: %s", k, v)) end
   add("duration_us", summary.duration)
   add("requests", summary.requests)
   add("errors_connect", summary.errors.connect)
   add("errors_read", summary.errors.read)
   add("errors_write", summary.errors.write)
   add("errors_status", summary.errors.status)
   add("errors_timeout", summary.errors.timeout)
   add("lat_p50_us", latency:percentile(50))
   add("lat_p99_us", latency:percentile(99))
   add("lat_p999_us", latency:percentile(99.9))
   add("lat_max_us", latency.max)
   add("lat_mean_us", latency.mean)
   local per = {}
   for _, thread in ipairs(threads) do
      local s = thread:get("stats")
      local codes = {}
      for key, n in pairs(s) do
         local code = string.match(key, "^code_(%d+)$")
         if code then table.insert(codes, string.format("%q: %d", code, n)) end
      end
      table.insert(per, string.format(
         '{"count": %d, "claimed": %d, "written": %d, "extra": %d, "ok": %d, "other": %d,'
            .. ' "late": %d, "late_10ms": %d, "max_late": %.6f, "t0": %.6f, "last_due": %.6f,'
            .. ' "last_answer": %.6f, "statuses": {%s}}',
         s.count, s.claimed, s.written, s.extra, s.ok, s.other, s.late, s.late_10ms, s.max_late,
         s.t0, s.last_due, s.last_answer, table.concat(codes, ", ")))
   end
   table.insert(parts, string.format('"threads": [%s]', table.concat(per, ", ")))
   local path = os.getenv("WEBHOOK_LOAD_OUT")
   local text = "{" .. table.concat(parts, ", ") .. "}\n"
   if path then
      local f = assert(io.open(path, "w"))
      f:write(text)
      f:close()
   else
      io.write(text)
   end
end
