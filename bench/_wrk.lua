-- wrk's script for bench/_loadgen.py's wrk(): POSTs the body in the file $WRK_BODY with
-- the Content-Type $WRK_CONTENT_TYPE, and prints wrk's summary as one line of JSON.
--
-- response() is defined only when a 4xx/5xx status is the one expected ($WRK_EXPECT):
-- it makes wrk hand every response to Lua, which costs speed. Otherwise wrk's own
-- summary.errors.status (responses with a status above 399) counts the wrong ones, and
-- the caller checks with one request first that the status is exactly the expected one.
local f = assert(io.open(os.getenv("WRK_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("WRK_CONTENT_TYPE")
local expect = tonumber(os.getenv("WRK_EXPECT"))
local threads = {}

function setup(thread)
  thread:set("unexpected", 0)
  table.insert(threads, thread)
end

if expect >= 400 then
  unexpected = 0
  function response(status, headers, body)
    if status ~= expect then unexpected = unexpected + 1 end
  end
end

-- done() runs in wrk's main Lua state, after the threads.
function done(summary, latency, requests)
  local unexpected = 0
  for _, t in ipairs(threads) do unexpected = unexpected + t:get("unexpected") end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"p50_us":%d,"p90_us":%d,' ..
    '"p99_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"unexpected":%d}\n',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), e.connect, e.read, e.write, e.status,
    e.timeout, unexpected))
end
