-- wrk script: POST one new raw data file per request (unique UUID, path and checksum).
-- Reads TOKEN, EOU, MODULE, LOCATION from the environment.
-- Each wrk thread has its own Lua state: thread_id is set (as a global) by setup() below, and
-- seeds that thread's random numbers so two threads never make the same UUIDs.
local counter = 0
thread_id = 0
local threads = {}

function setup(thread)
  thread:set("thread_id", #threads + 1)
  table.insert(threads, thread)
end

local token = os.getenv("TOKEN")
local eou = os.getenv("EOU")
local module = os.getenv("MODULE")
local location = os.getenv("LOCATION")

local function hex(n)
  local t = {}
  for i = 1, n do t[i] = string.format("%x", math.random(0, 15)) end
  return table.concat(t)
end

function init(args)
  math.randomseed(os.time() * 1000 + thread_id * 7919)
end

function request()
  counter = counter + 1
  local id = hex(8) .. "-" .. hex(4) .. "-4" .. hex(3) .. "-a" .. hex(3) .. "-" .. hex(12)
  local body = string.format(
    '{"id":"%s","relative_path":"wrk/t%d/%d/%s.dat","size":%d,"checksum":"%s",' ..
    '"instrument_module_id":%s,"executed_obs_unit_id":"%s","source_location_id":%s}',
    id, thread_id, counter, id, counter, hex(64), module, eou, location)
  return wrk.format("POST", "/api/v1/raw_data_files", {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. token,
  }, body)
end

bad = 0  -- global: done() collects it from every thread
function response(status, headers, body)
  if status ~= 201 then
    bad = bad + 1
    if bad < 3 then io.stderr:write("unexpected " .. status .. ": " .. body .. "\n") end
  end
end

function done(summary, latency, requests)
  local unexpected = 0  -- any answer but 201 (wrk itself counts only 4xx/5xx)
  for _, t in ipairs(threads) do unexpected = unexpected + t:get("bad") end
  io.write(string.format(
    "RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d errors=%d unexpected=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    summary.errors.connect + summary.errors.read + summary.errors.write +
    summary.errors.timeout, unexpected))
end
