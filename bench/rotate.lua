-- wrk script: rotates through the session tokens in the file named by the
-- environment variable TOKENS ("token<TAB>user" lines, as bench/seed.py
-- and examples/seed_sessions.rs write them), one `Cookie: sg_session=<token>`
-- per request, so that every seeded session is looked up. START=N begins
-- after the first N tokens, so that successive runs can continue one pass
-- (wrk itself always runs for its whole -d). Used by bench/load.sh (RSS
-- run) and bench/scaling.sh.
local tokens = {}
local path = os.getenv("TOKENS")
for line in io.lines(path) do
  local token = line:match("^([^\t]+)")
  if token then tokens[#tokens + 1] = "sg_session=" .. token end
end
assert(#tokens > 0, "no tokens in " .. tostring(path))
local i = (tonumber(os.getenv("START") or "0") or 0) % #tokens
local headers = {}

request = function()
  i = i % #tokens + 1
  headers["Cookie"] = tokens[i]
  return wrk.format("GET", "/", headers)
end
