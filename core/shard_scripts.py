"""The Lua scripts of a sharded job's shards. They run with the job scripts' ``KEYS`` (``core.scripts``)
and ``PRELUDE``; ``KEYS[9]`` is the shard's lease. Shards are JSON values of the job's shards hash
(``KEYS[14]``), fields as ``core.records.ShardState``. While shards run, the job's lease holds
``SHARDS_HOLDER`` and the job stays ``running``; a shard that fails or sees a cancel ends the job.
"""

SHARD_PRELUDE = """
local function shard(i)
  local raw = redis.call('HGET', KEYS[14], tostring(i))
  if raw then return cjson.decode(raw) end
  return nil
end
local function save(s) redis.call('HSET', KEYS[14], tostring(s.index), cjson.encode(s)) end
local function sharded() return status() == 'running' and redis.call('GET', KEYS[2]) == SHARDS_HOLDER end
local function holds(token) return redis.call('GET', KEYS[9]) == token end
local function stop(to, at, field, value)
  move(to)
  redis.call('HSET', KEYS[1], 'finished_at', at, 'updated_at', at, field, value)
  redis.call('DEL', KEYS[2])
end
"""

# ARGV: owner token, blocks_total, parallel, now, then one JSON shard per shard. The first
# ``parallel`` shards become ``queued`` (their indexes are returned, to be sent), the rest ``pending``.
START = """
if not owns(ARGV[1]) or status() ~= 'running' then return false end
redis.call('DEL', KEYS[14])
local send = {}
for i = 5, #ARGV do
  local s = cjson.decode(ARGV[i])
  if #send < tonumber(ARGV[3]) then
    s.status = 'queued'; s.sent_at = tonumber(ARGV[4]); table.insert(send, s.index)
  else
    s.status = 'pending'
  end
  save(s)
end
redis.call('HSET', KEYS[1], 'shards_total', #ARGV - 4, 'shards_done', 0, 'blocks_total', ARGV[2],
           'updated_at', ARGV[4])
redis.call('HDEL', KEYS[1], 'owner')
redis.call('SET', KEYS[2], SHARDS_HOLDER)
redis.call('SADD', KEYS[15], redis.call('HGET', KEYS[1], 'id'))
return send
"""

# ARGV: index, token, lease_ms, worker, now, cancelled_progress_json.
CLAIM = """
local st = status()
if not st then return 'missing' end
if st ~= 'running' then return st end
if redis.call('GET', KEYS[2]) ~= SHARDS_HOLDER then return 'busy' end
local s = shard(ARGV[1])
if not s then return 'missing' end
if s.status == 'done' then return 'done' end
if redis.call('EXISTS', KEYS[9]) == 1 then return 'busy' end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  stop('cancelled', ARGV[5], 'progress', ARGV[6])
  return 'cancelled'
end
s.status = 'running'; s.worker = ARGV[4]; s.done = 0; s.attempts = s.attempts + 1
save(s)
redis.call('SET', KEYS[9], ARGV[2], 'PX', tonumber(ARGV[3]))
return 'claimed'
"""

# ARGV: token, lease_ms.
RENEW = """
if not holds(ARGV[1]) then return 0 end
redis.call('PEXPIRE', KEYS[9], tonumber(ARGV[2]))
return 1
"""

# ARGV: index, token, blocks done. Returns {held, stop}: stop when a cancel was asked or the job ended.
PROGRESS = """
if not holds(ARGV[2]) then return {0, 1} end
if not sharded() then return {1, 1} end
local s = shard(ARGV[1])
s.done = tonumber(ARGV[3])
save(s)
return {1, redis.call('HGET', KEYS[1], 'cancel_requested') == '1' and 1 or 0}
"""

# ARGV: index, token, parts key, now. Returns {'merge'|'next'|'wait'|'lost', index of the next shard}.
DONE = """
if not holds(ARGV[2]) or not sharded() then return {'lost', -1} end
local s = shard(ARGV[1])
s.status = 'done'; s.key = ARGV[3]; s.done = s.blocks[2] - s.blocks[1]; s.completions = s.completions + 1
save(s)
redis.call('DEL', KEYS[9])
local done = redis.call('HINCRBY', KEYS[1], 'shards_done', 1)
redis.call('HSET', KEYS[1], 'updated_at', ARGV[4])
if done == tonumber(redis.call('HGET', KEYS[1], 'shards_total')) then
  redis.call('HSET', KEYS[1], 'shards_done_at', ARGV[4])
  return {'merge', -1}
end
local next = nil
for _, raw in ipairs(redis.call('HVALS', KEYS[14])) do
  local o = cjson.decode(raw)
  if o.status == 'pending' and (next == nil or o.index < next.index) then next = o end
end
if next == nil then return {'wait', -1} end
next.status = 'queued'; next.sent_at = tonumber(ARGV[4])
save(next)
return {'next', next.index}
"""

# ARGV: index, token, to ('failed' | 'cancelled'), now, job field, its value (error or progress JSON).
END = """
if not holds(ARGV[2]) then return 0 end
local s = shard(ARGV[1])
s.status = ARGV[3]
save(s)
redis.call('DEL', KEYS[9])
if sharded() then stop(ARGV[3], ARGV[4], ARGV[5], ARGV[6]) end
return 1
"""

# ARGV: index, token, when its retry message is due. A transient failure: the shard goes back to
# ``queued``; returns its retries so far.
RETRY = """
if not holds(ARGV[2]) then return -1 end
local s = shard(ARGV[1])
s.status = 'queued'; s.retries = s.retries + 1; s.sent_at = tonumber(ARGV[3])
save(s)
redis.call('DEL', KEYS[9])
return s.retries
"""

# ARGV: index, max_redeliveries, now, worker_lost_error_json, cancelled_progress_json.
RECOVER = """
if not sharded() then return 'skip' end
local s = shard(ARGV[1])
if not s or s.status ~= 'running' or redis.call('EXISTS', KEYS[9]) == 1 then return 'skip' end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  s.status = 'cancelled'; save(s)
  stop('cancelled', ARGV[3], 'progress', ARGV[5])
  return 'cancelled'
end
if s.redeliveries >= tonumber(ARGV[2]) then
  s.status = 'failed'; save(s)
  stop('failed', ARGV[3], 'error', ARGV[4])
  return 'failed'
end
s.status = 'queued'; s.redeliveries = s.redeliveries + 1; s.sent_at = tonumber(ARGV[3])
save(s)
return 'requeued'
"""

# ARGV: index, now, grace_s. A queued shard whose message went out over ``grace_s`` ago and never
# ran (lost with the worker that was sending it): returns 1 and restarts its clock, to send it again.
RESEND = """
if not sharded() then return 0 end
local s = shard(ARGV[1])
if not s or s.status ~= 'queued' or s.sent_at > tonumber(ARGV[2]) - tonumber(ARGV[3]) then return 0 end
s.sent_at = tonumber(ARGV[2])
save(s)
return 1
"""

SHARD_SCRIPTS = {"start": START, "claim": CLAIM, "renew": RENEW, "progress": PROGRESS, "done": DONE,
                 "end": END, "retry": RETRY, "recover": RECOVER, "resend": RESEND}
