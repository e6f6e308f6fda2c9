-- wrk script of benches/proxy_bench.sh: POSTs the same generateContent body, cycling over
-- the agents (path prefix /agents/{id}, or no prefix for direct runs), and prints one JSON
-- line of results. Arguments (after `--`): prefixed|direct, comma-separated agent ids, body.
local reqs = {}
local n = 0

function init(args)
  local prefixed = args[1] == "prefixed"
  local body = args[3]
  for id in string.gmatch(args[2], "[^,]+") do
    local path = "/v1beta/models/gemini-2.5-flash:generateContent"
    if prefixed then
      path = "/agents/" .. id .. path
    end
    reqs[#reqs + 1] = wrk.format("POST", path, { ["Content-Type"] = "application/json" }, body)
    if not prefixed then
      break
    end
  end
end

function request()
  n = n + 1
  return reqs[(n % #reqs) + 1]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,"p50":%d,"p99":%d,"p999":%d,"max":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max))
end
