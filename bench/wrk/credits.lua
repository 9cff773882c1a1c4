-- wrk script for bench/run.py: GET /credits or POST /credits/charge.
-- Arguments (after --): mode token nonce max_per_thread accounts account_prefix
--   mode: "get" or "charge"; every charge gets a fresh Idempotency-Key and
--   targets the next of `accounts` accounts named prefix0000, prefix0001, ...
-- With max_per_thread > 0 (run with -t1), exits after that many responses and
-- prints "BENCH_DONE {json}"; otherwise -d bounds the run and done() prints
-- "BENCH_RESULT {json}". run.py parses either line.

local threads = {}
local thread_count = 0

function setup(thread)
   thread_count = thread_count + 1
   thread:set("thread_id", thread_count)
   table.insert(threads, thread)
end

local mode, token, nonce, max_requests, accounts, prefix
local expected = 200
-- Globals, not locals: done() reads them from each thread with thread:get().
sent, responses, unexpected = 0, 0, 0

function init(args)
   mode = args[1]
   token = args[2]
   nonce = args[3]
   max_requests = tonumber(args[4])
   accounts = tonumber(args[5])
   prefix = args[6]
   if mode == "charge" then expected = 201 end
end

function request()
   sent = sent + 1
   local headers = {["Authorization"] = "Bearer " .. token}
   if mode == "charge" then
      headers["Content-Type"] = "application/json"
      headers["Idempotency-Key"] = string.format("%s-%d-%d", nonce, thread_id, sent)
      local body = string.format(
         '{"user_id":"%s%04d","amount_usdc":"0.0000001"}', prefix, sent % accounts)
      return wrk.format("POST", nil, headers, body)
   end
   return wrk.format("GET", nil, headers, nil)
end

function response(status, headers, body)
   responses = responses + 1
   if status ~= expected then unexpected = unexpected + 1 end
   if max_requests > 0 and responses >= max_requests then
      -- wrk's main thread would sleep out the whole -d duration after a
      -- thread:stop(), so a count-bounded run (one thread) reports and exits.
      io.write(string.format('BENCH_DONE {"responses":%d,"unexpected":%d}\n',
         responses, unexpected))
      io.flush()
      os.exit(0)
   end
end

function done(summary, latency, requests)
   local bad = 0
   local total = 0
   for _, thread in ipairs(threads) do
      bad = bad + (thread:get("unexpected") or 0)
      total = total + (thread:get("responses") or 0)
   end
   local errors = summary.errors
   io.write(string.format(
      'BENCH_RESULT {"requests":%d,"responses":%d,"duration_us":%d,"unexpected":%d,' ..
      '"socket_errors":%d,"p50_us":%d,"p99_us":%d}\n',
      summary.requests, total, summary.duration, bad,
      errors.connect + errors.read + errors.write + errors.timeout,
      latency:percentile(50), latency:percentile(99)))
end
