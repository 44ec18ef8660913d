-- POST /users/login with a JSON body: BENCH_PHONES="+86...,+86..." (rotated), BENCH_PASSWORD.
package.path = debug.getinfo(1, "S").source:match("^@(.*/)") .. "?.lua;" .. package.path
local common = require("common")
setup = common.setup
request = common.request

function init(args)
   local password = common.env("BENCH_PASSWORD")
   local requests = {}
   for _, phone in ipairs(common.split(common.env("BENCH_PHONES"))) do
      local body = string.format('{"phone":"%s","password":"%s"}', phone, password)
      requests[#requests + 1] = wrk.format("POST", nil, { ["Content-Type"] = "application/json" }, body)
   end
   common.rotate(requests)
end
