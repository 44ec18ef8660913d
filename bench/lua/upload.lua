-- POST a raw JPEG body: BENCH_BODY_FILE (read once per wrk thread, in init), BENCH_TOKENS
-- (bearer tokens, rotated), BENCH_CONTENT_TYPE (default image/jpeg).
--
-- Every request carries other bytes: a JPEG comment (COM segment, right after SOI) naming the wrk
-- thread and a counter; the pixels stay the same. demo stores bytes it has seen before without
-- decoding them again, and this measures the decode, so no upload may repeat an earlier one. The
-- comment has a fixed width, so each request's head (Content-Length included) is built once in init
-- and a request costs one copy of the body (one concatenation), in wrk, not in the server.
package.path = debug.getinfo(1, "S").source:match("^@(.*/)") .. "?.lua;" .. package.path
local common = require("common")
setup = common.setup

local NOTE = "bench upload %04d %012d"  -- fixed width: the body's length never changes
local heads, rest, index, sent = {}, nil, 0, 0

function init(args)
   local body = common.read_file(common.env("BENCH_BODY_FILE"))
   assert(body:sub(1, 2) == "\255\216", "bench: BENCH_BODY_FILE is not a JPEG")
   local note_length = #string.format(NOTE, 0, 0)
   -- SOI, then the COM marker and its length (two bytes, counting themselves); the note follows.
   local comment = "\255\216\255\254" .. string.char(0, note_length + 2)
   rest = body:sub(3)
   local length = #comment + note_length + #rest
   local content_type = common.env("BENCH_CONTENT_TYPE", "image/jpeg")
   for _, token in ipairs(common.split(common.env("BENCH_TOKENS"))) do
      local request = wrk.format("POST", nil, {["Authorization"] = "Bearer " .. token,
                                                ["Content-Type"] = content_type}, string.rep("x", length))
      heads[#heads + 1] = request:sub(1, #request - length) .. comment
   end
   index = (thread_number or 0) % #heads
end

function request()
   index = index % #heads + 1
   sent = sent + 1
   return heads[index] .. string.format(NOTE, thread_number or 0, sent) .. rest
end
