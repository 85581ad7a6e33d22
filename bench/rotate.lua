-- wrk script: rotates through the session tokens in the file named by the
-- environment variable TOKENS ("token<TAB>user" lines, as bench/seed.py
-- writes them), one `Cookie: sg_session=<token>` per request, so that every
-- seeded session is looked up. Used by bench/load.sh for the RSS run.
local tokens = {}
local path = os.getenv("TOKENS")
for line in io.lines(path) do
  local token = line:match("^([^\t]+)")
  if token then tokens[#tokens + 1] = "sg_session=" .. token end
end
assert(#tokens > 0, "no tokens in " .. tostring(path))
local i = 0
local headers = {}

request = function()
  i = i % #tokens + 1
  headers["Cookie"] = tokens[i]
  return wrk.format("GET", "/", headers)
end
