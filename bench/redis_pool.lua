-- The token pool as many teams would build it in Redis: one EVALSHA per activation.
-- ARGV: user id, ttl in seconds, history entries kept per token.
-- Keys (standalone Redis, so a script may name them itself):
--   tp:free          list of token ids, longest available first
--   tp:holder        hash user id -> token id (one token per user)
--   tp:lease:<tok>   hash: the token's current lease
--   tp:started       sorted set token id -> fence (oldest lease first, for eviction)
--   tp:expiry        sorted set token id -> expires_at in microseconds (lazy expiry)
--   tp:history:<tok> list of ended leases, newest first, capped
--   tp:rev           the pool's revision (fences and lease ids)
local user, ttl, keep = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local function finish(token, reason, ended_at)
  local key = 'tp:lease:' .. token
  local old = redis.call('HMGET', key, 'id', 'user_id', 'activated_at')
  redis.call('HDEL', 'tp:holder', old[2])
  redis.call('ZREM', 'tp:started', token)
  redis.call('ZREM', 'tp:expiry', token)
  redis.call('DEL', key)
  redis.call('LPUSH', 'tp:history:' .. token,
    old[1] .. ' ' .. old[2] .. ' ' .. old[3] .. ' ' .. string.format('%d', ended_at) .. ' ' .. reason)
  redis.call('LTRIM', 'tp:history:' .. token, 0, keep - 1)
end

-- Lazy expiry: end the few leases that are due (bounded work per call).
local due = redis.call('ZRANGEBYSCORE', 'tp:expiry', '-inf', now, 'WITHSCORES', 'LIMIT', 0, 8)
for i = 1, #due, 2 do
  finish(due[i], 'expired', due[i + 1])
  redis.call('RPUSH', 'tp:free', due[i])
end

local held = redis.call('HGET', 'tp:holder', user)
if held then
  return redis.call('HGETALL', 'tp:lease:' .. held)
end
local token = redis.call('LPOP', 'tp:free')
if not token then
  local oldest = redis.call('ZRANGE', 'tp:started', 0, 0)
  if #oldest == 0 then
    return redis.error_reply('UNAVAILABLE the pool has no tokens')
  end
  token = oldest[1]
  finish(token, 'evicted', now)
end
local fence = redis.call('INCR', 'tp:rev')
local expires = now + math.floor(ttl * 1000000)
local lease = {'id', tostring(fence), 'token_id', token, 'user_id', user, 'fence', tostring(fence),
               'activated_at', string.format('%d', now), 'expires_at', string.format('%d', expires)}
redis.call('HSET', 'tp:lease:' .. token, unpack(lease))
redis.call('ZADD', 'tp:started', fence, token)
redis.call('ZADD', 'tp:expiry', expires, token)
redis.call('HSET', 'tp:holder', user, token)
return lease
