-- wrk script for `make bench`: POST OpenAI chat completions, cycling over virtual model names.
--
--   wrk -t1 -c32 -d10s --latency -s bench/post.lua http://127.0.0.1:PORT
--
-- BENCH_MODELS (comma-separated) picks the model names; the default exercises the weight-,
-- priority- and latency-based virtual models of bench/gateway.yaml. The floor (Envoy alone)
-- receives the same requests and ignores the model. At the end, one line starting with
-- "BENCH_JSON " carries the counts and latency percentiles (microseconds) for bench/run.py.

local models = {}
for name in string.gmatch(os.getenv("BENCH_MODELS") or "prod-chat,prod/reliable,prod-fast", "[^,]+") do
  models[#models + 1] = name
end

local requests = {}
local index = 0

function init(args)
  for i, model in ipairs(models) do
    local body = '{"model":"' .. model .. '","messages":[{"role":"system","content":"You are a '
      .. 'helpful assistant."},{"role":"user","content":"Write a haiku about load balancers."}],'
      .. '"temperature":0.7,"max_tokens":64}'
    requests[i] = wrk.format("POST", "/v1/chat/completions",
      {["content-type"] = "application/json", ["x-internal-trace"] = "bench"}, body)
  end
end

function request()
  index = index % #requests + 1
  return requests[index]
end

function done(summary, latency, requests)
  local e = summary.errors
  local p = {}
  for _, q in ipairs({50, 75, 90, 99, 99.9}) do
    p[#p + 1] = string.format('"%s":%d', tostring(q), latency:percentile(q))
  end
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"errors":{"connect":%d,"read":%d,'
      .. '"write":%d,"status":%d,"timeout":%d},"latency_us":{"mean":%.1f,"max":%d,"stdev":%.1f,'
      .. '"percentiles":{%s}}}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency.mean, latency.max, latency.stdev, table.concat(p, ",")))
end
