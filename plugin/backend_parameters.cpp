#include "plugin/backend_parameters.hpp"

#include <sstream>

#include "common/error.hpp"
#include "common/log.hpp"
#include "common/parse.hpp"

namespace cbd::backend {

const char* const kBackendParametersHelp =
    "transport=PATH           Transport: /dev/daxX.Y, a /dev/shm file or a PCI resource file (default /dev/shm/cbd).\n"
    "format=true              Format the transport first if it is not formatted (never reformats).\n"
    "transport-size=SIZE      Size of the transport file format=true creates (default 256M).\n"
    "backend-id=N             Take over backend slot N (restart after a crash); default: first free slot.\n"
    "hostname=NAME            Name of this storage node in the transport (default: gethostname).\n"
    "export=NAME              Export name published to compute nodes (default: \"\").\n"
    "allow-hosts=A,B,...      Serve only channels of these compute hosts (default: all).\n"
    "handlers=N               Handler threads (default 1).\n"
    "queue-depth=N            Store requests in flight per handler thread (default 64).\n"
    "spin-us=N                Polling: spin this long after activity (default 50).\n"
    "max-sleep-us=N           Polling: longest back-off sleep while busy (default 1000).\n"
    "idle-sleep-us=N          Polling: longest sleep after 1 s without I/O (default 10000).";

bool apply_backend_parameter(BackendParameters& p, const std::string& key, const std::string& value) {
  if (key == "transport") {
    if (value.empty()) throw Error("transport=: a path is needed");
    p.transport = value;
  } else if (key == "format") {
    p.format = parse_bool(value, key);
  } else if (key == "transport-size") {
    p.transport_size = parse_size(value, key);
  } else if (key == "backend-id") {
    std::uint64_t id = parse_number(value, key);
    if (id >= kNoSlot) throw Error("backend-id=" + value + ": too large");
    p.config.backend_id = static_cast<std::uint32_t>(id);
  } else if (key == "hostname") {
    p.config.hostname = value;
  } else if (key == "export") {
    p.config.export_name = value;
  } else if (key == "allow-hosts") {
    std::stringstream list(value);
    for (std::string host; std::getline(list, host, ',');)
      if (!host.empty()) p.config.allow_hosts.push_back(host);
  } else if (key == "handlers") {
    p.config.handlers = static_cast<unsigned>(parse_number(value, key));
    if (p.config.handlers == 0 || p.config.handlers > 64) throw Error("handlers=" + value + ": use 1 to 64");
  } else if (key == "queue-depth") {
    p.config.queue_depth = static_cast<unsigned>(parse_number(value, key));
    if (p.config.queue_depth == 0 || p.config.queue_depth > 4096) throw Error("queue-depth=" + value + ": use 1 to 4096");
  } else if (key == "spin-us") {
    p.config.poll.spin_us = static_cast<std::uint32_t>(parse_number(value, key));
  } else if (key == "max-sleep-us") {
    p.config.poll.max_sleep_us = static_cast<std::uint32_t>(parse_number(value, key));
    if (p.config.poll.max_sleep_us == 0) throw Error("max-sleep-us=0: must be at least 1");
  } else if (key == "idle-sleep-us") {
    p.config.poll.idle_sleep_us = static_cast<std::uint32_t>(parse_number(value, key));
    if (p.config.poll.idle_sleep_us == 0) throw Error("idle-sleep-us=0: must be at least 1");
  } else {
    return false;
  }
  return true;
}

void BackendRuntime::prepare(const BackendParameters& parameters, Store& store) {
  RegionOptions region_options;
  if (parameters.format) {
    region_options.create = true;
    region_options.size = parameters.transport_size;
  }
  Region region = Region::open(parameters.transport, region_options);
  if (parameters.format && !looks_formatted(region)) {
    FormatOptions format_options;
    format_options.size = parameters.transport_size;
    format(region, format_options);
    log(LogLevel::Info, "formatted transport %s", parameters.transport.c_str());
  } else if (!looks_formatted(region)) {
    throw Error("transport " + parameters.transport +
                ": not formatted — run `cbd-proxy format transport=" + parameters.transport +
                "` or add format=true");
  }
  transport_.emplace(std::move(region));
  service_ = std::make_unique<BackendService>(*transport_, store, parameters.config);
}

void BackendRuntime::start() {
  if (!service_) throw Error("the backend was not prepared");
  service_->start();
}

void BackendRuntime::stop() {
  if (service_) service_->stop();
}

}  // namespace cbd::backend
