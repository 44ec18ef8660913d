-- Shared by the bench scripts: parameters come from the environment (set by bench/run.py).
-- Every request is built once per wrk thread in init(); request() only picks the next one, so
-- wrk spends no more CPU per request than with a static request.
local common = {}

function common.env(name, default)
   local value = os.getenv(name)
   if value == nil or value == "" then
      if default == nil then error("bench: environment variable " .. name .. " is not set") end
      return default
   end
   return value
end

function common.split(text)
   local items = {}
   for item in string.gmatch(text, "[^,]+") do items[#items + 1] = item end
   return items
end

function common.read_file(path)
   local f = assert(io.open(path, "rb"))
   local data = f:read("*a")
   f:close()
   return data
end

-- Give each wrk thread a number, so the threads start at different users.
local threads = 0
function common.setup(thread)
   thread:set("thread_number", threads)
   threads = threads + 1
end

-- Each script sets `request = common.request` at load time (wrk decides when it loads the script
-- whether requests are dynamic) and fills the list in init() with common.rotate(list).
local prebuilt, index = {}, 0

function common.rotate(requests)
   prebuilt = requests
   index = (thread_number or 0) % #requests
end

function common.request()
   index = index % #prebuilt + 1
   return prebuilt[index]
end

return common
