%%% mod_s2s_dane_proxy: send every outgoing server-to-server stream of ejabberd to
%%% xmpp-dane-proxy, with no DNS of ejabberd's own to fall back to.
%%%
%%% ejabberd 23.01 (xmpp library 1.6.1).  With this module loaded, every outgoing S2S stream
%%% (ordinary streams and mod_s2s_dialback's key-verification streams) connects, in plaintext,
%%% to the proxy's `outbound.listen` address
%%%
%%%     modules:
%%%       mod_s2s_dialback: {}
%%%       mod_s2s_dane_proxy:
%%%         ip: "127.0.0.1"      # default
%%%         port: 15269          # default
%%%
%%% and the proxy finds the peer through DNSSEC, does STARTTLS or Direct TLS, authenticates the
%%% peer with DANE or PKIX and relays the stream.  ejabberd authenticates itself to the peer
%%% with Server Dialback, as before.  See README.md next to this file.
%%%
%%% How.  xmpp_stream_out (the generic outgoing stream of the xmpp library) calls its callback
%%% module's resolve/2 before any DNS lookup of its own, and does its own SRV lookup (Erlang's
%%% inet_res) and, when that fails *for any reason*, an address lookup of the peer domain
%%% (C library) only when resolve/2 is not exported or returns [].  The callback module is the
%%% `mod` key of the stream's state, ejabberd_s2s_out, and ejabberd_s2s_out:init/1 runs the
%%% `s2s_out_init` hook with that state.  Our hook makes this module the callback module:
%%%
%%%   * resolve/2 always returns exactly one target, the proxy's IP literal: xmpp_stream_out
%%%     then never looks anything up (an IP literal passes net:getaddrinfo without a query),
%%%     and when the proxy is down the connection fails; there is nothing else to try;
%%%   * tls_enabled/1 and tls_required/1 answer false: the hop to the proxy is plaintext on
%%%     loopback by design (TLS and DANE are between the proxy and the peer), whatever
%%%     `s2s_use_starttls` says for incoming streams;
%%%   * every other callback is ejabberd_s2s_out's.  A callback ejabberd_s2s_out does not
%%%     export raises {xmpp_stream_out, undef}, exactly what xmpp_stream_out:callback/2,3
%%%     raises for a missing callback, so its defaults apply unchanged.
%%%
%%% A crash in resolve/2 (e.g. the module was unloaded under a stream) stops that stream: it
%%% never falls back to DNS.  The hook itself never crashes (see s2s_out_init/2).
-module(mod_s2s_dane_proxy).

-behaviour(gen_mod).

-include_lib("kernel/include/logger.hrl").

%% gen_mod
-export([start/2, stop/1, reload/3, depends/2, mod_opt_type/1, mod_options/1, mod_doc/0]).
%% hook
-export([s2s_out_init/2]).
%% xmpp_stream_out callbacks: ours ...
-export([resolve/2, tls_enabled/1, tls_required/1]).
%% ... and ejabberd_s2s_out's (23.01 exports exactly these as callbacks).
-export([tls_options/1, tls_verify/1, connect_options/3, connect_timeout/1, address_families/1,
         default_port/1, dns_retries/1, dns_timeout/1, handle_auth_success/2,
         handle_auth_failure/3, handle_packet/2, handle_stream_end/2,
         handle_stream_downgraded/2, handle_recv/3, handle_send/3, handle_cdata/2,
         handle_stream_established/1, handle_timeout/1, handle_call/3, handle_cast/2,
         handle_info/2, terminate/2, code_change/3]).

%% Before mod_s2s_dialback's s2s_out_init (50); the order does not matter for correctness,
%% both only add keys to the state.
-define(HOOK_SEQ, 10).

%%%===================================================================== gen_mod

start(Host, Opts) ->
    ejabberd_hooks:add(s2s_out_init, Host, ?MODULE, s2s_out_init, ?HOOK_SEQ),
    ?LOG_INFO("Outgoing s2s connections of ~ts are routed to the DANE proxy at ~ts",
              [Host, format_address(proxy_address(Opts))]),
    ok.

stop(Host) ->
    ejabberd_hooks:delete(s2s_out_init, Host, ?MODULE, s2s_out_init, ?HOOK_SEQ),
    ok.

%% The address is read for every new connection, so a reload applies to the next one.
reload(Host, NewOpts, _OldOpts) ->
    ?LOG_INFO("Outgoing s2s connections of ~ts are routed to the DANE proxy at ~ts",
              [Host, format_address(proxy_address(NewOpts))]),
    ok.

%% Over the plaintext hop ejabberd cannot use SASL EXTERNAL (xmpp_stream_out offers it only
%% on encrypted streams), so without dialback no outgoing stream could authenticate.
depends(_Host, _Opts) ->
    [{mod_s2s_dialback, hard}].

mod_opt_type(ip) -> econf:ip();
mod_opt_type(port) -> econf:port().

%% 127.0.0.1:15269 is the proxy's default `outbound.listen`.
mod_options(_Host) ->
    [{ip, {127, 0, 0, 1}}, {port, 15269}].

mod_doc() ->
    #{desc => [<<"Routes every outgoing S2S stream, in plaintext, to xmpp-dane-proxy's "
                 "outbound.listen address (ip, port); ejabberd does no DNS for S2S.">>]}.

%%%===================================================================== hook

%% ejabberd_hooks:run_fold/4 goes on with the previous value when a hook crashes, which here
%% would leave ejabberd_s2s_out (and its DNS) in charge, so this never crashes.  Refusing the
%% stream is no option either: ejabberd_s2s expects {ok, Pid} from ejabberd_s2s_out:start/3 and
%% would crash.  So every stream is taken over, also one whose callback module another module
%% had replaced (that module's callbacks are lost; the stream still goes to the proxy).
s2s_out_init({ok, State}, _Opts) when is_map(State) ->
    {ok, take_over(State)};
s2s_out_init({ok, State, Timeout}, _Opts) when is_map(State) ->
    {ok, take_over(State), Timeout};
s2s_out_init(Acc, _Opts) ->
    Acc.  % {stop, _} or ignore: the stream does not start anyway

take_over(#{mod := Mod} = State) when Mod =/= ejabberd_s2s_out, Mod =/= ?MODULE ->
    ?LOG_WARNING("Outgoing s2s stream: callback module ~p replaced by ~p, so that the stream goes "
                 "to the DANE proxy", [Mod, ?MODULE]),
    State#{mod => ?MODULE};
take_over(State) ->
    State#{mod => ?MODULE}.

%%%===================================================================== our callbacks

%% {Address, Port, DirectTLS}: one plaintext (STARTTLS-capable, but see tls_enabled/1) target.
resolve(_Host, #{server_host := ServerHost, server := LServer, remote_server := RServer}) ->
    {IP, Port} = proxy_address(gen_mod:get_module_opts(ServerHost, ?MODULE)),
    ?LOG_DEBUG("Outgoing s2s ~ts -> ~ts goes through the DANE proxy at ~ts",
               [LServer, RServer, format_address({IP, Port})]),
    [{IP, Port, false}].

tls_enabled(_State) -> false.

tls_required(_State) -> false.

%%%===================================================================== ejabberd_s2s_out's

tls_options(S) -> delegate(tls_options, [S]).
tls_verify(S) -> delegate(tls_verify, [S]).
connect_options(Addr, Opts, S) -> delegate(connect_options, [Addr, Opts, S]).
connect_timeout(S) -> delegate(connect_timeout, [S]).
address_families(S) -> delegate(address_families, [S]).
default_port(S) -> delegate(default_port, [S]).
dns_retries(S) -> delegate(dns_retries, [S]).
dns_timeout(S) -> delegate(dns_timeout, [S]).
handle_auth_success(Mech, S) -> delegate(handle_auth_success, [Mech, S]).
handle_auth_failure(Mech, Reason, S) -> delegate(handle_auth_failure, [Mech, Reason, S]).
handle_packet(Pkt, S) -> delegate(handle_packet, [Pkt, S]).
handle_stream_end(Reason, S) -> delegate(handle_stream_end, [Reason, S]).
handle_stream_downgraded(StreamStart, S) -> delegate(handle_stream_downgraded, [StreamStart, S]).
handle_recv(El, Pkt, S) -> delegate(handle_recv, [El, Pkt, S]).
handle_send(El, Pkt, S) -> delegate(handle_send, [El, Pkt, S]).
handle_cdata(Data, S) -> delegate(handle_cdata, [Data, S]).
handle_stream_established(S) -> delegate(handle_stream_established, [S]).
handle_timeout(S) -> delegate(handle_timeout, [S]).
handle_call(Request, From, S) -> delegate(handle_call, [Request, From, S]).
handle_cast(Msg, S) -> delegate(handle_cast, [Msg, S]).
handle_info(Info, S) -> delegate(handle_info, [Info, S]).
terminate(Reason, S) -> delegate(terminate, [Reason, S]).
code_change(OldVsn, S, Extra) -> delegate(code_change, [OldVsn, S, Extra]).

delegate(Function, Args) ->
    case erlang:function_exported(ejabberd_s2s_out, Function, length(Args)) of
        true -> erlang:apply(ejabberd_s2s_out, Function, Args);
        %% What xmpp_stream_out:callback/2,3 raises itself: its default applies.
        false -> erlang:error({xmpp_stream_out, undef})
    end.

%%%===================================================================== helpers

proxy_address(Opts) ->
    {gen_mod:get_opt(ip, Opts), gen_mod:get_opt(port, Opts)}.

format_address({IP, Port}) when tuple_size(IP) =:= 8 ->
    io_lib:format("[~ts]:~B", [inet:ntoa(IP), Port]);
format_address({IP, Port}) ->
    io_lib:format("~ts:~B", [inet:ntoa(IP), Port]).
