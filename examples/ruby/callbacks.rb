# A Ruby callback service that receives patient's outcomes as Sidekiq jobs.
#
# `patient serve` delivers a task submitted with
#   "deliver": {"sidekiq": {"queue": "default"}}
# as the job the PatientHttp Sidekiq integration's CallbackWorker runs:
#   {"class": "PatientHttp::Sidekiq::CallbackWorker", "queue": "default",
#    "args": [<Response or Error JSON>, "response" | "error", "<callback>"], "jid": ..., ...}
#
# An app that uses that integration needs no code for it: its CallbackWorker
# loads the payload and calls the callback. With the daemon's
# `[encryption] format = "active_support"` (and a `[payload_store]` the app
# registers under the same name) args[0] is the encrypted envelope or a
# `$ref`, which that CallbackWorker fetches and decrypts with the same
# `encryption_key`; this stand-in reads plain payloads only. This file stands in for the
# integration where it is not installed (it needs Sidekiq 7; this runs on the
# Sidekiq 6.4 Debian ships), with the same job shape, so the callback classes
# below are what an app writes either way:
#
#   REDIS_URL=redis://127.0.0.1:6379/0 sidekiq -r ./examples/ruby/callbacks.rb -q default
#
# Each callback here appends one JSON line to $PATIENT_EXAMPLE_OUT (or prints
# it), so a test can read what arrived.

require "json"
require "sidekiq"

module PatientHttp
  module Sidekiq
    # Runs the callback a job names: `on_complete(response)` for a response,
    # `on_error(error)` for an error (both the wire-format hashes).
    class CallbackWorker
      include ::Sidekiq::Worker

      def perform(payload, kind, callback)
        handler = Object.const_get(callback).new
        case kind
        when "response" then handler.on_complete(payload)
        when "error" then handler.on_error(payload)
        else raise ArgumentError, "unknown payload kind #{kind.inspect}"
        end
      end
    end
  end
end

# Where the example callbacks report.
def report(line)
  out = ENV["PATIENT_EXAMPLE_OUT"]
  if out
    File.open(out, "a") { |f| f.puts(JSON.generate(line)) }
  else
    puts JSON.generate(line)
  end
end

# An application's callback: one method per outcome.
class ExampleCallback
  def on_complete(response)
    report("callback" => "ExampleCallback", "kind" => "response",
           "task_id" => response["request_id"], "status" => response["status"],
           "callback_args" => response["callback_args"])
  end

  def on_error(error)
    report("callback" => "ExampleCallback", "kind" => "error",
           "task_id" => error["request_id"], "class_name" => error["class_name"] || error["error_class"],
           "callback_args" => error["callback_args"])
  end
end
