-- GET with a WebView's cookies: BENCH_COOKIES="demo_h5=<v1>,demo_h5=<v2>,..." (one per user, rotated).
package.path = debug.getinfo(1, "S").source:match("^@(.*/)") .. "?.lua;" .. package.path
local common = require("common")
setup = common.setup
request = common.request

function init(args)
   local requests = {}
   for _, cookie in ipairs(common.split(common.env("BENCH_COOKIES"))) do
      requests[#requests + 1] = wrk.format("GET", nil, { ["Cookie"] = cookie })
   end
   common.rotate(requests)
end
