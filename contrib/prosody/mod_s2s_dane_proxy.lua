-- mod_s2s_dane_proxy: send every outgoing server-to-server connection to xmpp-dane-proxy.
--
-- Prosody 0.12.  With this module loaded, Prosody no longer looks up SRV/A/AAAA/TLSA for
-- remote domains: every outgoing S2S stream goes, in plaintext, to the address in
--
--     s2s_dane_proxy = "127.0.0.1:15269"      -- the proxy's outbound.listen
--
-- and the proxy finds the peer through DNSSEC, does STARTTLS or Direct TLS, authenticates the
-- peer with DANE or PKIX, and authenticates Prosody's domain to the peer on its behalf (the
-- proxy answers Prosody's stream and its Server Dialback itself).  See README.md next to this
-- file.
--
-- How: Prosody 0.12 has no event between "outgoing session created" and "resolver built"
-- (`s2sout-created` fires first; there is no `s2sout-pre-connect`).  mod_s2s builds the
-- resolver in route_to_new_session() by calling `service.new(to_host, "xmpp-server", ...)`
-- (and, when the host has a TLS context, a chain that asks `"xmpps-server"` first), looking
-- the function up in the shared net.resolvers.service table at call time.  Replacing that
-- table entry is therefore enough: "xmpp-server" becomes a fixed target (net.resolvers.basic
-- with an IP literal resolves nothing), "xmpps-server" becomes an empty list (Direct TLS is the
-- proxy's job, towards the peer).  Only mod_s2s uses net.resolvers.service in 0.12, and only
-- these two service names; anything else is passed through untouched.
module:set_global();

local service = require "net.resolvers.service";
local basic = require "net.resolvers.basic";
local manual = require "net.resolvers.manual";
local inet_pton = require "util.net".pton;

local option = module:get_option_string("s2s_dane_proxy", "127.0.0.1:15269");

-- "IPv4:PORT", "[IPv6]:PORT" or "name:PORT"
local proxy_host, proxy_port = option:match("^%[([^%]]+)%]:(%d+)$");
if not proxy_host then
	proxy_host, proxy_port = option:match("^([^:%[%]]+):(%d+)$");
end
proxy_port = tonumber(proxy_port);
if not proxy_host or not proxy_port or proxy_port < 1 or proxy_port > 65535 then
	error(("s2s_dane_proxy = %q: expected \"IP:PORT\" or \"[IPv6]:PORT\""):format(option));
end
if not inet_pton(proxy_host) then
	-- Allowed, but then Prosody resolves that name itself (A/AAAA) for every connection.
	module:log("warn", "s2s_dane_proxy host %q is not an IP address; an IP literal avoids a DNS lookup per connection", proxy_host);
end

-- The hop to the proxy is plaintext on loopback by design (the proxy does TLS to the peer).
-- With s2s_require_encryption = true Prosody would send <starttls/> to the proxy and drop every
-- stream when it is refused.
if module:get_option_boolean("s2s_require_encryption", true) then
	module:log("error", "s2s_require_encryption is true (Prosody's default): outgoing S2S through the DANE proxy "
		.."will fail; set s2s_require_encryption = false (the proxy enforces TLS and DANE towards the peer)");
end
if module:get_option_boolean("use_dane", false) then
	module:log("info", "use_dane has no effect on outgoing S2S with s2s_dane_proxy: the proxy does DANE");
end

local original_new = service.new;

local function routed_new(hostname, service_name, conn_type, extra)
	if service_name == "xmpp-server" then
		module:log("debug", "Outgoing s2s to %s goes through the DANE proxy at %s", hostname, option);
		-- The stream header still says to=hostname: that is what the proxy connects to.
		return basic.new(proxy_host, proxy_port, conn_type, extra);
	elseif service_name == "xmpps-server" then
		-- No Direct TLS to the proxy: an empty resolver, so the chain falls through to the
		-- plaintext one above.
		return manual.new({}, conn_type, extra);
	end
	return original_new(hostname, service_name, conn_type, extra);
end

service.new = routed_new;
module:log("info", "Outgoing s2s connections are routed to the DANE proxy at %s", option);

-- Key checks go out at once.  Prosody 0.12 queues a <db:verify> for a new outgoing stream in
-- its sendq until that stream is authenticated (mod_s2s route_to_new_session / mark_connected),
-- so checking an incoming peer's key would wait for -- and fail with -- Prosody's own stream
-- to that peer.  Behind the proxy that is needless: the proxy answers keys it minted itself
-- (DESIGN §3.3) and asks the peer about any other, on an unauthenticated stream as XEP-0220
-- §2.3 allows (mod_s2s itself sends <db:verify> there once a dialback key is out).  So when
-- the (proxy's) features arrive, queued key checks are sent before anything else; stanzas stay
-- queued until the stream is authenticated.  Priority 110: before mod_dialback (100) starts
-- Prosody's own dialback on the same features.
function module.add_host(host_module)
	host_module:hook_tag("http://etherx.jabber.org/streams", "features", function (session)
		local sendq = session.sendq;
		if session.type ~= "s2sout_unauthed" or not sendq then return; end
		local keep = {};
		for _, item in ipairs(sendq) do
			if item[1]:match("^<db:verify[%s>]") then
				session.log("debug", "sending a queued dialback key check ahead of authentication (s2s_dane_proxy)");
				session.sends2s(item[1]);
			else
				keep[#keep + 1] = item;
			end
		end
		session.sendq = #keep > 0 and keep or nil;
	end, 110);
end

function module.unload()
	-- Restore only if nobody replaced it after us.
	if service.new == routed_new then
		service.new = original_new;
	end
end
