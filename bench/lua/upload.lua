-- POST a raw image body: BENCH_BODY_FILE (read once per wrk thread, in init), BENCH_TOKENS
-- (bearer tokens, rotated), BENCH_CONTENT_TYPE (default image/jpeg).
package.path = debug.getinfo(1, "S").source:match("^@(.*/)") .. "?.lua;" .. package.path
local common = require("common")
setup = common.setup
request = common.request

function init(args)
   local body = common.read_file(common.env("BENCH_BODY_FILE"))
   local content_type = common.env("BENCH_CONTENT_TYPE", "image/jpeg")
   local requests = {}
   for _, token in ipairs(common.split(common.env("BENCH_TOKENS"))) do
      requests[#requests + 1] = wrk.format("POST", nil, {
         ["Authorization"] = "Bearer " .. token,
         ["Content-Type"] = content_type,
      }, body)
   end
   common.rotate(requests)
end
