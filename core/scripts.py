"""The Lua scripts of the job store: every state change is one script, so the status, the index
move and the lease check happen atomically. Key names come in through ``KEYS`` (see
``core.keys``); no script spells one.
"""

from core.keys import SHARDS_HOLDER

# KEYS of every job script (``JobStore._keys``): 1 job, 2 lease, 3-7 the five status indexes (in
# STATUSES order), 8 all-jobs index, 9 a script's extra key (or ''), 10 expiry, 11 webhooks, and two
# ``string.format`` templates, not keys: 12 a tenant's index, 13 a tenant's status index; 14 the
# job's shards hash, 15 the set of sharded jobs.
PRELUDE = f"""
local SHARDS_HOLDER = '{SHARDS_HOLDER}'
""" + """
local IDX = {queued=3, running=4, succeeded=5, failed=6, cancelled=7}
local function status() return redis.call('HGET', KEYS[1], 'status') end
local function hset_pairs(first)
  for i = first, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
local function owns(token) return redis.call('GET', KEYS[2]) == token end
local TERMINAL = {succeeded=true, failed=true, cancelled=true}
local function tenant() return redis.call('HGET', KEYS[1], 'tenant') or 'default' end
local function tkey(t, st)
  if st then return string.format(KEYS[13], t, st) end
  return string.format(KEYS[12], t)
end
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
local function on_terminal()
  local id = redis.call('HGET', KEYS[1], 'id')
  local at = clock()
  redis.call('ZADD', KEYS[10], at, id)
  redis.call('SREM', KEYS[15], id)
  local url = redis.call('HGET', KEYS[1], 'callback_url')
  if url and url ~= '' and not redis.call('HGET', KEYS[1], 'webhook_status') then
    redis.call('HSET', KEYS[1], 'webhook_status', 'pending', 'webhook_next_at', tostring(at))
    redis.call('ZADD', KEYS[11], at, id)
  end
end
local function move(to)
  local from = status()
  local ix = redis.call('HGET', KEYS[1], 'ix')
  local t = tenant()
  if from and IDX[from] then
    redis.call('ZREM', KEYS[IDX[from]], ix)
    redis.call('ZREM', tkey(t, from), ix)
  end
  redis.call('ZADD', KEYS[IDX[to]], 0, ix)
  redis.call('ZADD', tkey(t, to), 0, ix)
  redis.call('HSET', KEYS[1], 'status', to)
  if TERMINAL[to] then on_terminal() end
end
"""

# ARGV: idem_value, idem_ttl_s, tenant, max_queued, then field/value pairs.
# KEYS[9]: the idempotency key or ''. Returns {'created'|'exists'|'limit', detail}.
CREATE = """
if KEYS[9] ~= '' then
  local prior = redis.call('GET', KEYS[9])
  if prior then return {'exists', prior} end
end
local t = ARGV[3]
local queued = redis.call('ZCARD', tkey(t, 'queued'))
if queued >= tonumber(ARGV[4]) then return {'limit', tostring(queued)} end
hset_pairs(5)
redis.call('HSET', KEYS[1], 'status', 'queued', 'tenant', t)
local ix = redis.call('HGET', KEYS[1], 'ix')
redis.call('ZADD', KEYS[8], 0, ix)
redis.call('ZADD', KEYS[3], 0, ix)
redis.call('ZADD', tkey(t), 0, ix)
redis.call('ZADD', tkey(t, 'queued'), 0, ix)
if KEYS[9] ~= '' then redis.call('SET', KEYS[9], ARGV[1], 'EX', tonumber(ARGV[2])) end
return {'created', ''}
"""

# ARGV: token, lease_ms, now, delivery_tag, worker, stale_owner. KEYS[9]: the retrying index.
# A sharded job whose shards are all done may be claimed (to merge them) from SHARDS_HOLDER.
CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
local st = status()
if st == 'running' and redis.call('EXISTS', KEYS[2]) == 1 then
  local holder = redis.call('GET', KEYS[2])
  local merge = holder == SHARDS_HOLDER and
    redis.call('HGET', KEYS[1], 'shards_done') == redis.call('HGET', KEYS[1], 'shards_total')
  if not merge and (ARGV[6] == '' or holder ~= ARGV[6]) then return 'busy' end
end
if st ~= 'queued' and st ~= 'running' then return st end
redis.call('ZREM', KEYS[9], redis.call('HGET', KEYS[1], 'id'))
redis.call('HDEL', KEYS[1], 'retry_at')
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  move('cancelled')
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[3], 'updated_at', ARGV[3])
  return 'cancelled'
end
move('running')
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'delivery_tag', ARGV[4], 'worker', ARGV[5],
           'started_at', ARGV[3], 'updated_at', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('SET', KEYS[2], ARGV[1], 'PX', tonumber(ARGV[2]))
return 'claimed'
"""

# ARGV: token, then field/value pairs. Returns {owned, cancel_requested}.
UPDATE = """
if not owns(ARGV[1]) or status() ~= 'running' then return {0, 0} end
hset_pairs(2)
local cancel = redis.call('HGET', KEYS[1], 'cancel_requested') == '1' and 1 or 0
return {1, cancel}
"""

# ARGV: token, lease_ms.
RENEW = """
if not owns(ARGV[1]) then return 0 end
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[2]))
return 1
"""

# ARGV: token, to_status, then field/value pairs.
FINISH = """
if not owns(ARGV[1]) or status() ~= 'running' then return 0 end
move(ARGV[2])
hset_pairs(3)
redis.call('HDEL', KEYS[1], 'owner')
redis.call('DEL', KEYS[2])
return 1
"""

# ARGV: token, retry_at, then field/value pairs. KEYS[9]: the retrying index.
RETRY = """
if not owns(ARGV[1]) or status() ~= 'running' then return 0 end
move('queued')
hset_pairs(3)
redis.call('HINCRBY', KEYS[1], 'retries', 1)
redis.call('HSET', KEYS[1], 'retry_at', ARGV[2])
redis.call('HDEL', KEYS[1], 'owner')
redis.call('ZADD', KEYS[9], tonumber(ARGV[2]), redis.call('HGET', KEYS[1], 'id'))
redis.call('DEL', KEYS[2])
return 1
"""

# ARGV: now, cancelled_progress_json.
CANCEL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
local st = status()
if st == 'queued' then
  move('cancelled')
  redis.call('HSET', KEYS[1], 'cancel_requested', '1', 'finished_at', ARGV[1], 'updated_at', ARGV[1],
             'progress', ARGV[2])
  return 'cancelled'
end
if st == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1', 'updated_at', ARGV[1])
  return 'cancel_requested'
end
return st
"""

# ARGV: now, max_redeliveries, worker_lost_error_json, requeued_progress_json, cancelled_progress_json.
RECOVER = """
if status() ~= 'running' or redis.call('EXISTS', KEYS[2]) == 1 then return {'skip', ''} end
local tag = redis.call('HGET', KEYS[1], 'delivery_tag') or ''
redis.call('HDEL', KEYS[1], 'owner')
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  move('cancelled')
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[1], 'updated_at', ARGV[1], 'progress', ARGV[5])
  return {'cancelled', tag}
end
local n = tonumber(redis.call('HGET', KEYS[1], 'redeliveries') or '0')
if n >= tonumber(ARGV[2]) then
  move('failed')
  redis.call('HSET', KEYS[1], 'error', ARGV[3], 'finished_at', ARGV[1], 'updated_at', ARGV[1])
  return {'failed', tag}
end
move('queued')
redis.call('HINCRBY', KEYS[1], 'redeliveries', 1)
redis.call('HSET', KEYS[1], 'progress', ARGV[4], 'updated_at', ARGV[1])
return {'requeued', tag}
"""

DELETE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
local st = status()
if st == 'queued' or st == 'running' then return st end
local ix = redis.call('HGET', KEYS[1], 'ix')
local id = redis.call('HGET', KEYS[1], 'id')
local t = tenant()
redis.call('ZREM', KEYS[IDX[st]], ix)
redis.call('ZREM', KEYS[8], ix)
redis.call('ZREM', tkey(t, st), ix)
redis.call('ZREM', tkey(t), ix)
redis.call('ZREM', KEYS[10], id)
redis.call('ZREM', KEYS[11], id)
redis.call('DEL', KEYS[1], KEYS[14])
return 'deleted'
"""


# KEYS[1]: the due set. ARGV: now, lease_s, limit. Takes due webhooks, hiding each for lease_s.
TAKE_WEBHOOKS = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), id) end
return due
"""

# KEYS: job, due set. ARGV: status, attempt_json, max_shown, next_at ('' when done), job_id.
WEBHOOK_ATTEMPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[5])
  return 0
end
local attempts = cjson.decode(redis.call('HGET', KEYS[1], 'webhook_attempts') or '[]')
table.insert(attempts, cjson.decode(ARGV[2]))
while #attempts > tonumber(ARGV[3]) do table.remove(attempts, 1) end
redis.call('HSET', KEYS[1], 'webhook_status', ARGV[1], 'webhook_attempts', cjson.encode(attempts))
redis.call('HINCRBY', KEYS[1], 'webhook_attempt_count', 1)
if ARGV[4] == '' then
  redis.call('HDEL', KEYS[1], 'webhook_next_at')
  redis.call('ZREM', KEYS[2], ARGV[5])
else
  redis.call('HSET', KEYS[1], 'webhook_next_at', ARGV[4])
  redis.call('ZADD', KEYS[2], tonumber(ARGV[4]), ARGV[5])
end
return 1
"""


JOB_SCRIPTS = {"create": CREATE, "claim": CLAIM, "update": UPDATE, "renew": RENEW, "finish": FINISH,
               "retry": RETRY, "cancel": CANCEL, "recover": RECOVER, "delete": DELETE}
