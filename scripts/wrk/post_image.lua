-- wrk script: POST one image file's bytes as image/jpeg and summarise the answers as JSON.
--
--   wrk -t 16 -c 16 -d 15s --timeout 30s -s scripts/wrk/post_image.lua \
--       http://127.0.0.1:8000 -- build/bench/small.jpg [polite]
--
-- Arguments after "--" (or environment variables): the body file (WRK_BODY), "polite" or
-- "impolite" (WRK_POLITE=1), "unique" (default) or "same" (WRK_SAME=1), the request path
-- (WRK_PATH, default /classify?top_k=5), the body's Content-Type (WRK_CONTENT_TYPE, default
-- image/jpeg; scripts/bench_peers.py sends application/json to the :predict paths).
--
-- Unique (default): every request's JPEG differs by a 16-hex-digit counter in a comment (COM)
-- segment right after SOI, so the bytes, their hash and the stored file are new each time, as
-- in real traffic (the service stores each distinct image once). Same: one body for all; a body
-- that is not a JPEG (a JSON body) is always sent the same.
--
-- Run it with one connection per wrk thread (-t equal to -c). wrk calls request() and
-- response() per thread, without saying for which connection; with one connection a thread
-- they alternate strictly, so this script times every answer itself (wall clock through
-- LuaJIT's ffi, clock_gettime(CLOCK_MONOTONIC)) and keeps the latencies of the 200s apart.
-- wrk's own latency object covers every answer (200s and 503s together) and wrk "corrects" it
-- for coordinated omission by adding synthetic samples, so it is reported only as
-- wrk_all_answers_*. With several connections a thread the pairing is lost and the per-status
-- latencies mean nothing (loadgen.wrk_drive then drops them).
--
-- Impolite (default): wrk's closed loop, a client sends its next request as soon as it has an
-- answer, 503 or not. Polite: after a 503 the connection waits as long as Retry-After says
-- (seconds, at most 1) before its next request, through wrk's delay().
--
-- At done() one line is printed: "WRK_JSON " followed by the JSON summary.

local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } wrk_timespec;
int clock_gettime(int clk_id, wrk_timespec *tp);
]]
local ts = ffi.new("wrk_timespec")
local function now_us()
   ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
   return tonumber(ts.tv_sec) * 1000000 + tonumber(ts.tv_nsec) / 1000
end

local threads = {}

function setup(thread)
   thread:set("id", #threads + 1)
   table.insert(threads, thread)
end

-- per-thread state (each wrk thread has its own Lua environment)
local req
local path_q, headers_q, prefix, rest  -- the parts of a unique request
local counter = 0
local polite = false
local started = nil      -- when the outstanding request was generated
local next_delay = 0
ok = 0
shed = 0
shed_no_retry_after = 0
other = 0
others = {}
lat_ok = {}
lat_shed = {}
shed_sample = nil        -- Retry-After and the start of the first 503's body

function init(args)
   local path = args[1] or os.getenv("WRK_BODY")
   local mode = args[2] or ((os.getenv("WRK_POLITE") == "1") and "polite" or "impolite")
   polite = (mode == "polite")
   assert(path, "no body file: pass it after -- or in WRK_BODY")
   local fh = assert(io.open(path, "rb"))
   local body = fh:read("*a")
   fh:close()
   local same = (args[3] == "same") or (os.getenv("WRK_SAME") == "1")
   path_q = os.getenv("WRK_PATH") or "/classify?top_k=5"
   headers_q = {["Content-Type"] = os.getenv("WRK_CONTENT_TYPE") or "image/jpeg",
                ["Host"] = wrk.host}
   if same or string.sub(body, 1, 2) ~= "\255\216" then
      req = wrk.format("POST", path_q, headers_q, body)
   else
      -- SOI, then COM (FF FE) of length 2 + 16, then the counter, then the rest of the file
      prefix = "\255\216\255\254\0\18"
      rest = string.sub(body, 3)
   end
end

function delay()
   local d = next_delay
   next_delay = 0
   return d
end

function request()
   -- called again without an answer after a socket error: the newest start is the one answered
   started = now_us()
   if req then return req end
   counter = counter + 1
   return wrk.format("POST", path_q, headers_q,
                     prefix .. string.format("%08x%08x", id or 0, counter) .. rest)
end

local function header(headers, name)
   local v = headers[name]
   if v ~= nil then return v end
   local lower = string.lower(name)
   for k, value in pairs(headers) do
      if string.lower(k) == lower then return value end
   end
   return nil
end

function response(status, headers, body)
   local elapsed = started and (now_us() - started) or nil
   if status == 200 then
      ok = ok + 1
      if elapsed then lat_ok[#lat_ok + 1] = elapsed end
   elseif status == 503 then
      shed = shed + 1
      if elapsed then lat_shed[#lat_shed + 1] = elapsed end
      local retry = header(headers, "Retry-After")
      if retry == nil then
         shed_no_retry_after = shed_no_retry_after + 1
      end
      if shed_sample == nil then
         shed_sample = tostring(retry) .. " " .. string.sub(body or "", 1, 300)
      end
      if polite then
         next_delay = math.min(tonumber(retry) or 1, 1) * 1000
      end
   else
      other = other + 1
      local key = tostring(status)
      others[key] = (others[key] or 0) + 1
   end
end

local function percentile(sorted, q)
   local n = #sorted
   if n == 0 then return nil end
   -- linear interpolation between closest ranks (numpy's default)
   local pos = (q / 100) * (n - 1) + 1
   local lo = math.floor(pos)
   local hi = math.min(lo + 1, n)
   return sorted[lo] + (pos - lo) * (sorted[hi] - sorted[lo])
end

local function json_string(s)
   if s == nil then return "null" end
   s = string.gsub(s, '[%c"\\]', function(c)
      return string.format("\\u%04x", string.byte(c))
   end)
   return '"' .. s .. '"'
end

local function ms(us)
   if us == nil then return "null" end
   return string.format("%.1f", us / 1000)
end

function done(summary, latency, requests)
   local t = {ok = 0, shed = 0, shed_no_retry_after = 0, other = 0}
   local all_ok, all_shed, others_all = {}, {}, {}
   local sample = nil
   for _, thread in ipairs(threads) do
      sample = sample or thread:get("shed_sample")
      for k, _ in pairs(t) do t[k] = t[k] + (thread:get(k) or 0) end
      for _, v in ipairs(thread:get("lat_ok") or {}) do all_ok[#all_ok + 1] = v end
      for _, v in ipairs(thread:get("lat_shed") or {}) do all_shed[#all_shed + 1] = v end
      for k, v in pairs(thread:get("others") or {}) do others_all[k] = (others_all[k] or 0) + v end
   end
   table.sort(all_ok)
   table.sort(all_shed)
   local e = summary.errors
   local other_parts = {}
   for k, v in pairs(others_all) do other_parts[#other_parts + 1] = string.format('"%s": %d', k, v) end
   io.write("WRK_JSON {",
      string.format('"duration_s": %.3f, ', summary.duration / 1e6),
      string.format('"answers": %d, "bytes": %d, ', summary.requests, summary.bytes),
      string.format('"ok": %d, "shed_503": %d, "shed_without_retry_after": %d, "other": %d, ',
                    t.ok, t.shed, t.shed_no_retry_after, t.other),
      '"other_statuses": {', table.concat(other_parts, ", "), '}, ',
      string.format('"socket_errors": {"connect": %d, "read": %d, "write": %d, "timeout": %d}, ',
                    e.connect, e.read, e.write, e.timeout),
      string.format('"wrk_threads": %d, ', #threads),
      string.format('"ok_p50_ms": %s, "ok_p95_ms": %s, "ok_p99_ms": %s, "ok_max_ms": %s, ',
                    ms(percentile(all_ok, 50)), ms(percentile(all_ok, 95)),
                    ms(percentile(all_ok, 99)), ms(all_ok[#all_ok])),
      string.format('"shed_p50_ms": %s, "shed_p99_ms": %s, ',
                    ms(percentile(all_shed, 50)), ms(percentile(all_shed, 99))),
      string.format('"wrk_all_answers_p50_ms": %s, "wrk_all_answers_p99_ms": %s, ',
                    ms(latency:percentile(50)), ms(latency:percentile(99))),
      '"first_503": ', json_string(sample),
      "}\n")
end
