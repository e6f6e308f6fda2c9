-- wrk script of benches/proxy_bench.sh (and scripts/build-pgo.sh): POSTs the same body,
-- cycling over the agents (path prefix /agents/{id}, or no prefix for direct runs), and
-- prints one JSON line of results. Arguments (after `--`): prefixed|direct|mix,
-- comma-separated agent ids, body. `prefixed` and `direct` call generateContent; `mix`
-- (build-pgo.sh's training load) calls, per agent, the mix agents make: 7 generateContent,
-- 2 streamGenerateContent?alt=sse, 1 streamGenerateContent (a JSON array), 1 countTokens.
local reqs = {}
local n = 0

local MIX = {
  "generateContent", "generateContent", "generateContent", "generateContent",
  "generateContent", "generateContent", "generateContent",
  "streamGenerateContent?alt=sse", "streamGenerateContent?alt=sse",
  "streamGenerateContent", "countTokens",
}

function init(args)
  local mode = args[1]
  local calls = mode == "mix" and MIX or { "generateContent" }
  local body = args[3]
  for id in string.gmatch(args[2], "[^,]+") do
    for _, call in ipairs(calls) do
      local path = "/v1beta/models/gemini-2.5-flash:" .. call
      if mode ~= "direct" then
        path = "/agents/" .. id .. path
      end
      reqs[#reqs + 1] = wrk.format("POST", path, { ["Content-Type"] = "application/json" }, body)
    end
    if mode == "direct" then
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
