-- GET with a bearer token: BENCH_TOKENS="<t1>,<t2>,..." (one per user, rotated).
package.path = debug.getinfo(1, "S").source:match("^@(.*/)") .. "?.lua;" .. package.path
local common = require("common")
setup = common.setup
request = common.request

function init(args)
   local requests = {}
   for _, token in ipairs(common.split(common.env("BENCH_TOKENS"))) do
      requests[#requests + 1] = wrk.format("GET", nil, { ["Authorization"] = "Bearer " .. token })
   end
   common.rotate(requests)
end
