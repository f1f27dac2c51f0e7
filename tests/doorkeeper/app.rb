# frozen_string_literal: true
#
# Minimal single-file Rails API application running a real Doorkeeper
# (client_credentials only) on sqlite, for k2-shared-token tests.
#
# Configured entirely by environment variables read at boot:
#   DK_DATABASE          sqlite file path (required in practice; default ./doorkeeper.sqlite3)
#   DK_EXPIRES_IN        token lifetime in seconds (default 3600)
#   DK_REUSE=1           reuse_access_token
#   DK_REUSE_LIMIT       token_reuse_limit (default 100, only with DK_REUSE=1)
#   DK_REVOKE_PREVIOUS=1 revoke_previous_client_credentials_token
#   DK_DEFAULT_SCOPES    space separated default scopes (default none)
#   DK_CLIENT_ID / DK_CLIENT_SECRET  the seeded application (defaults test-client / test-secret)
#   DK_BUSY_TIMEOUT_MS   sqlite busy timeout (default 500)
#   DK_SQLITE_IMMEDIATE  1 (default) opens write transactions with BEGIN IMMEDIATE,
#                        avoiding sqlite's instant "database is locked" (500) on a
#                        lock upgrade; 0 keeps Rails' BEGIN DEFERRED
#   DK_POOL              ActiveRecord pool size (default 16, >= puma threads)
#   DK_LOG               log file (default: no Rails log at all)
#   DK_LOG_LEVEL         log level for DK_LOG (default warn)

require "logger"
require "json"
require "digest"
require "rails"
require "active_record/railtie"
require "action_controller/railtie"
require "doorkeeper"

module DK
  def self.env_flag(name, default = false)
    v = ENV.fetch(name, "").strip.downcase
    v.empty? ? default : %w[1 true yes on].include?(v)
  end

  def self.env_int(name, default)
    v = ENV.fetch(name, "").strip
    v.empty? ? default : Integer(v, 10)
  end

  DATABASE = File.expand_path(ENV.fetch("DK_DATABASE", "doorkeeper.sqlite3"))
  EXPIRES_IN = env_int("DK_EXPIRES_IN", 3600)
  REUSE = env_flag("DK_REUSE")
  REUSE_LIMIT = env_int("DK_REUSE_LIMIT", 100)
  REVOKE_PREVIOUS = env_flag("DK_REVOKE_PREVIOUS")
  DEFAULT_SCOPES = ENV.fetch("DK_DEFAULT_SCOPES", "").split
  CLIENT_ID = ENV.fetch("DK_CLIENT_ID", "test-client")
  CLIENT_SECRET = ENV.fetch("DK_CLIENT_SECRET", "test-secret")
  BUSY_TIMEOUT_MS = env_int("DK_BUSY_TIMEOUT_MS", 500)
  POOL = env_int("DK_POOL", 16)
  SQLITE_IMMEDIATE = env_flag("DK_SQLITE_IMMEDIATE", true)
  LOG = ENV["DK_LOG"]
  LOG_LEVEL = ENV.fetch("DK_LOG_LEVEL", "warn")

  # Thread-safe request counters, served by the outermost middleware so that
  # every request is counted whatever Rails/Doorkeeper do with it.
  class Counter
    KEYS = %w[token_requests token_issued token_errors api_calls api_401 api_ok server_errors].freeze

    def initialize(app)
      @app = app
      @lock = Mutex.new
      @counts = Hash[KEYS.map { |k| [k, 0] }]
      @issued_at = [] # wall-clock epoch seconds of each 200 from /oauth/token
      # Every /oauth/token request, in the order answered: began/at (epoch seconds), status,
      # fp (the issued token's fingerprint as k2_shared_token logs it: "sha256:" + 12 hex
      # digits, never the token) and error (the OAuth error code of a refusal).
      @requests = []
    end

    def call(env)
      path = env["PATH_INFO"]
      verb = env["REQUEST_METHOD"]
      if path == "/__counts" && verb == "GET"
        return json(200, @lock.synchronize { @counts.dup })
      elsif path == "/__issued" && verb == "GET"
        return json(200, @lock.synchronize { { "issued_at" => @issued_at.dup, "requests" => @requests.dup } })
      elsif path == "/__reset" && verb == "POST"
        @lock.synchronize do
          KEYS.each { |k| @counts[k] = 0 }
          @issued_at.clear
          @requests.clear
        end
        return json(200, { "reset" => true })
      end

      token = verb == "POST" && path == "/oauth/token"
      api = path == "/api/ping"
      bump("token_requests") if token
      bump("api_calls") if api
      began = Process.clock_gettime(Process::CLOCK_REALTIME)
      status = 500
      fields = {}
      begin
        status, headers, body = @app.call(env)
        if token
          text = read_body(body)
          body = [text]
          fields = token_fields(text)
        end
        [status, headers, body]
      ensure
        status = status.to_i
        bump(status == 200 ? "token_issued" : "token_errors") if token
        issued if token && status == 200
        record(began, status, fields) if token
        bump("api_401") if api && status == 401
        bump("api_ok") if api && status == 200
        bump("server_errors") if status >= 500
      end
    end

    private

    def bump(key)
      @lock.synchronize { @counts[key] += 1 }
    end

    def issued
      now = Process.clock_gettime(Process::CLOCK_REALTIME)
      @lock.synchronize { @issued_at << now }
    end

    def record(began, status, fields)
      now = Process.clock_gettime(Process::CLOCK_REALTIME)
      entry = { "began" => began, "at" => now, "status" => status }.merge(fields)
      @lock.synchronize { @requests << entry }
    end

    def read_body(body)
      text = +""
      body.each { |chunk| text << chunk }
      text
    ensure
      body.close if body.respond_to?(:close)
    end

    # The token's fingerprint and the error code of a reply; the token itself is not kept.
    def token_fields(text)
      reply = JSON.parse(text)
      return {} unless reply.is_a?(Hash)
      out = {}
      value = reply["access_token"]
      out["fp"] = "sha256:" + Digest::SHA256.hexdigest(value)[0, 12] if value.is_a?(String)
      out["error"] = reply["error"].to_s[0, 64] if reply.key?("error")
      out
    rescue JSON::ParserError
      {}
    end

    def json(status, obj)
      [status, { "Content-Type" => "application/json", "Cache-Control" => "no-store" }, [JSON.generate(obj)]]
    end
  end
end

ENV.delete("DATABASE_URL")

class DoorkeeperTestApp < Rails::Application
  config.root = __dir__
  config.api_only = true
  config.eager_load = false
  config.cache_classes = true
  config.consider_all_requests_local = false
  config.secret_key_base = "k2-shared-token-doorkeeper-test-" * 4
  config.require_master_key = false
  config.hosts.clear if config.respond_to?(:hosts)
  config.active_support.deprecation = :silence
  config.action_dispatch.show_exceptions = true
  config.public_file_server.enabled = false
  config.filter_parameters += %i[client_secret token access_token]

  if DK::LOG && !DK::LOG.empty?
    logger = ActiveSupport::Logger.new(DK::LOG)
    logger.level = DK::LOG_LEVEL
    config.log_level = DK::LOG_LEVEL.to_sym
  else
    logger = ActiveSupport::Logger.new(File::NULL)
    logger.level = :fatal
    config.log_level = :fatal
  end
  logger.formatter = ::Logger::Formatter.new
  config.logger = logger

  # Count before anything else (including ActionDispatch::ShowExceptions).
  config.middleware.insert_before 0, DK::Counter

  # No config/database.yml: describe the database here (the active_record
  # railtie reads config.database_configuration at boot).
  def config.database_configuration
    {
      Rails.env => {
        "adapter" => "sqlite3",
        "database" => DK::DATABASE,
        "pool" => DK::POOL,
        "timeout" => DK::BUSY_TIMEOUT_MS,
      },
    }
  end
end

# sqlite busy handling. sqlite3 gem 1.4's busy_timeout (what Rails sets from
# "timeout") sleeps inside C while holding Ruby's GVL, so a puma thread
# waiting for the write lock freezes the thread that holds it: every wait
# runs to its full timeout and ends in a 500 "database is locked". Replace it
# with a Ruby busy handler that sleeps with the GVL released and gives up
# after DK_BUSY_TIMEOUT_MS.
#
# Rails 6.1 also opens transactions as BEGIN DEFERRED: a transaction that
# read first and then writes while another connection holds the write lock
# gets SQLITE_BUSY at once (no busy wait) -> 500. DK_SQLITE_IMMEDIATE (default on) opens
# them as BEGIN IMMEDIATE so writers queue on the busy handler instead.
module DK
  module SQLiteBusy
    def configure_connection
      super
      limit = DK::BUSY_TIMEOUT_MS / 1000.0
      since = nil
      @connection.busy_handler do |count|
        now = Process.clock_gettime(Process::CLOCK_MONOTONIC)
        since = now if count.zero? || since.nil?
        if now - since >= limit
          false
        else
          sleep(count < 10 ? 0.001 : 0.005)
          true
        end
      end
    end
  end

  module SQLiteImmediate
    def begin_db_transaction
      log("begin immediate transaction", "TRANSACTION") { @connection.transaction(:immediate) }
    end
  end
end

ActiveSupport.on_load(:active_record) do
  require "active_record/connection_adapters/sqlite3_adapter"
  ActiveRecord::ConnectionAdapters::SQLite3Adapter.prepend(DK::SQLiteBusy)
  ActiveRecord::ConnectionAdapters::SQLite3Adapter.prepend(DK::SQLiteImmediate) if DK::SQLITE_IMMEDIATE
end

Doorkeeper.configure do
  orm :active_record
  api_only
  base_controller "ActionController::API"
  grant_flows %w[client_credentials]
  access_token_expires_in DK::EXPIRES_IN
  if DK::REUSE
    reuse_access_token
    token_reuse_limit DK::REUSE_LIMIT
  end
  revoke_previous_client_credentials_token if DK::REVOKE_PREVIOUS
  default_scopes(*DK::DEFAULT_SCOPES) unless DK::DEFAULT_SCOPES.empty?
  # Same rule as Doorkeeper's default, written out: a client may introspect
  # its own tokens (client credentials), a token may introspect tokens of
  # its own application.
  allow_token_introspection do |token, authorized_client, authorized_token|
    if authorized_token
      authorized_token.application == token&.application
    elsif token&.application
      authorized_client == token.application
    else
      true
    end
  end
  # No resource owners in this grant; silence the "not configured" warnings.
  resource_owner_authenticator { nil }
  admin_authenticator { head :forbidden }
end

Rails.application.initialize!

ActiveRecord::Base.connection_pool.with_connection do |conn|
  conn.execute("PRAGMA journal_mode=WAL")
  conn.execute("PRAGMA synchronous=NORMAL")
  ActiveRecord::Schema.verbose = false
  ActiveRecord::Schema.define do
    create_table :oauth_applications, if_not_exists: true do |t|
      t.string  :name,    null: false
      t.string  :uid,     null: false
      t.string  :secret,  null: false
      t.text    :redirect_uri # nullable: client_credentials has no redirect URI
      t.string  :scopes,       null: false, default: ""
      t.boolean :confidential, null: false, default: true
      t.timestamps             null: false
      t.index :uid, unique: true
    end

    create_table :oauth_access_grants, if_not_exists: true do |t|
      t.references :resource_owner,  null: false
      t.references :application,     null: false, foreign_key: { to_table: :oauth_applications }
      t.string   :token,             null: false
      t.integer  :expires_in,        null: false
      t.text     :redirect_uri,      null: false
      t.datetime :created_at,        null: false
      t.datetime :revoked_at
      t.string   :scopes,            null: false, default: ""
      t.index :token, unique: true
    end

    create_table :oauth_access_tokens, if_not_exists: true do |t|
      t.references :resource_owner, index: true
      t.references :application,    null: false, foreign_key: { to_table: :oauth_applications }
      t.string   :token, null: false
      t.string   :refresh_token
      t.integer  :expires_in
      t.datetime :revoked_at
      t.datetime :created_at, null: false
      t.string   :scopes
      t.string   :previous_refresh_token, null: false, default: ""
      t.index :token, unique: true
      t.index :refresh_token, unique: true
    end
  end
end

# Seed (or update) the one application. Secrets are stored with Doorkeeper's
# configured application_secret_strategy (Plain unless hash_application_secrets).
ActiveRecord::Base.connection_pool.with_connection do
  app = Doorkeeper::Application.find_or_initialize_by(uid: DK::CLIENT_ID)
  app.name = "k2-shared-token-test"
  app.secret = DK::CLIENT_SECRET
  app.redirect_uri = ""
  app.scopes = ""
  app.confidential = true
  app.save!
end

# Load what requests need now (no autoloading under puma threads, faster first request).
Doorkeeper::TokensController
Doorkeeper::TokenInfoController

class ApiController < ActionController::API
  before_action :doorkeeper_authorize!

  def ping
    render json: { ok: true }
  end
end

Rails.application.routes.draw do
  use_doorkeeper do
    skip_controllers :authorizations, :applications, :authorized_applications
  end
  get "/api/ping", to: "api#ping"
end

ActiveRecord::Base.clear_active_connections!
