-- wrk script of scripts/build-pgo.sh: the training load, a mix of the calls agents make
-- (7 generateContent, 2 streamGenerateContent?alt=sse, 1 streamGenerateContent as a JSON
-- array, 1 countTokens), cycling over the agents (path prefix /agents/{id}).
-- Arguments (after `--`): comma-separated agent ids, body.
local reqs = {}
local n = 0

function init(args)
  local calls = {
    "generateContent", "generateContent", "generateContent", "generateContent",
    "generateContent", "generateContent", "generateContent",
    "streamGenerateContent?alt=sse", "streamGenerateContent?alt=sse",
    "streamGenerateContent", "countTokens",
  }
  for id in string.gmatch(args[1], "[^,]+") do
    for _, call in ipairs(calls) do
      local path = "/agents/" .. id .. "/v1beta/models/gemini-2.5-flash:" .. call
      reqs[#reqs + 1] = wrk.format("POST", path, { ["Content-Type"] = "application/json" }, args[2])
    end
  end
end

function request()
  n = n + 1
  return reqs[(n % #reqs) + 1]
end
